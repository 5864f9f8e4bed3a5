"""The gateway agent's core: commands in, blocks fetched, nodes updated, status out.

Rules (spec: ``docs/topics.md`` §Gateway, ``docs/drivers-and-hooks.md``):

* No MQTT here: :meth:`GatewayAgent.handle` takes one message (topic, bytes)
  and returns the messages to publish; :meth:`GatewayAgent.tick` does the same
  for timers and for news from the job workers. The service in
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
* Everything a restart needs is on disk (``data_dir``): the jobs, their status
  sequence numbers and their hooks' retry counts (``agent.cbor``, written
  atomically), the downloads with their block bitmaps
  (:mod:`gateway_proxy.downloads`), and the images flashed to nodes
  (``images/<sha256>.bin``), which are the bases of deltas. A restarted job
  starts again at Download_Enter; its download resumes from disk, and the
  node resumes the transfer at its own offset.
* A delta is rebuilt from the image the gateway last flashed with that digest;
  without it the job switches to the full artifact the command also names.
* The artifact is verified (signature, digest, device type) before anything is
  rebuilt or flashed; the node verifies again itself.
* Each job runs in a worker thread of its own, one per node at a time: state
  hooks (:mod:`gateway_proxy.hooks`) at every phase boundary, then the node's
  driver (:mod:`gateway_proxy.drivers`). Blocks are fetched in the message
  loop once the job's Download_Enter hooks passed, and handed to the worker
  when the download is complete. Hooks never run in the message loop.
* A hook that asks to retry later holds its job: the job reports ``deferred``
  with the hook's name, the attempt and the delay, and nothing of that phase
  reaches the node until the hooks pass. A job may be cancelled while it has
  not written to its node (download, or held at Flash_Enter); after that, it
  runs to its end.
* Nodes on different ports are updated in parallel, and one node's failure
  (a broken third-party driver included) never stops another's job.
* The inventory reports a node's ``primary`` (version, sequence, digest,
  size) as its driver tells it. A driver that cannot tell Shoal's facts
  (``smp``: MCUboot knows a version and its own hash, not Shoal's sequence
  or the image file's digest) gets them from the gateway for an image the
  gateway installed itself: what the driver reported right after the job
  (version and boot state) is kept on disk with the artifact's facts, and a
  later report of exactly that stands for that image. Anything else is
  reported without a ``primary``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.downloads import Download
from gateway_proxy.drivers import (
    DriverLoadError,
    DriverNotFound,
    DriverOptionError,
    HookFailed,
    InstallProgress,
    NodeDriver,
    NodeInventory,
    Phase,
    ProgressFn,
    UpdateCancelled,
    UpdateOutcome,
    When,
    make_driver,
)
from gateway_proxy.hooks import HookRunner, Verdict, find_hooks, hook_name, last_line, survey
from otaio.files import write_atomic
from otaproto import cbor, fleet
from otaproto import topics as t
from otaproto.artifact import VerifiedArtifact, verify_artifact
from otaproto.errors import InvalidInput, ShoalError
from otaproto.keys import TrustedKeys

log = logging.getLogger("shoal.gateway")

AGENT_VERSION = "shoal-gateway 0.2"
FETCH_RETRY_S = 5.0
#: While a node is being flashed, how often its progress is reported.
PROGRESS_REPORT_S = 1.0
STATE_FILE = "agent.cbor"
#: Final reports repeated after each (re)connect: the newest this many.
RESENT_FINAL_REPORTS = 32
MAX_STATE_BYTES = 4 * 1024 * 1024
#: STATUS ``reason`` is at most this long (``docs/topics.md``: longtext, 4096 bytes).
MAX_REASON_BYTES = 4000

Outgoing = tuple[str, bytes]
DriverFactory = Callable[[NodePort], NodeDriver]


class _Refused(InvalidInput):
    """The downloaded artifact failed the gateway's checks."""


@dataclass
class Job:
    """One node's part of one deployment, as this gateway runs it.

    The first fields are persisted; the rest live with the worker thread.
    """

    deployment: str
    node: str
    artifact: fleet.ArtifactRef
    full: fleet.ArtifactRef | None
    state: str = "downloading"
    status_seq: int = 0
    reason: str = ""
    mqtt_bytes: int = 0
    #: Boundary (``Flash_Enter``) -> hook runs that asked to retry later, so far.
    hook_attempts: dict[str, int] = field(default_factory=dict)
    last_fetch_s: float = field(default=0.0, compare=False)
    #: A worker thread runs this job.
    worker: bool = field(default=False, compare=False)
    #: Download_Enter passed (or there are no such hooks): the download may run.
    download_open: bool = field(default=False, compare=False)
    #: The message loop fetches blocks for this job (until they are all here).
    fetching: bool = field(default=False, compare=False)
    #: The job may write to its node now: cancelling is no longer possible.
    flashing: bool = field(default=False, compare=False)
    #: The state reported before the current deferral, reported again when it ends.
    resume_state: str = field(default="", compare=False)
    #: The downloaded artifact (or why there is none; None: cancelled), for the worker.
    inbox: queue.Queue[bytes | Exception | None] = field(
        default_factory=queue.Queue, compare=False, repr=False
    )
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.deployment}/{self.node}"

    def to_map(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment, "node": self.node, "artifact": self.artifact.to_map(),
            "full": self.full.to_map() if self.full else None, "state": self.state,
            "status_seq": self.status_seq, "reason": self.reason, "mqtt_bytes": self.mqtt_bytes,
            "hook_attempts": dict(self.hook_attempts),
        }  # fmt: skip

    @classmethod
    def from_map(cls, raw: dict[str, Any]) -> Job:
        attempts = raw.get("hook_attempts") or {}
        if not isinstance(attempts, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in attempts.items()
        ):
            raise TypeError("hook_attempts must map boundary names to counts")
        return cls(
            raw["deployment"], raw["node"], fleet.ArtifactRef.from_map(raw["artifact"], "artifact"),
            fleet.ArtifactRef.from_map(raw["full"], "full") if raw.get("full") else None,
            raw["state"], raw["status_seq"], raw.get("reason", ""), raw.get("mqtt_bytes", 0),
            dict(attempts),
        )  # fmt: skip


class GatewayAgent:
    """The gateway's decisions; see the module rules.

    ``drivers`` makes the driver of a node from its configuration (tests pass
    their own); drivers are made on first use and kept.
    """

    def __init__(
        self,
        config: GatewayConfig,
        trusted: TrustedKeys,
        *,
        drivers: DriverFactory = make_driver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.trusted = trusted
        self._make_driver = drivers
        self._clock = clock
        self._nodes = {n.name: n for n in config.nodes}
        self._drivers: dict[str, NodeDriver | InvalidInput] = {}
        self._drivers_lock = threading.Lock()
        #: Held by whoever talks to a node: a job's driver, or the inventory.
        self._node_locks = {name: threading.Lock() for name in self._nodes}
        self._busy_nodes: set[str] = set()
        self._device_types: dict[str, str] = {}
        self._hooks = HookRunner(config.hooks)
        self._data = config.data_dir
        self._data.mkdir(parents=True, exist_ok=True)
        (self._data / "images").mkdir(exist_ok=True)
        self._downloads: dict[bytes, Download] = {}
        self._news: queue.Queue[Outgoing] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.handled_seq = 0
        self.jobs: dict[str, Job] = {}
        self._finals: list[bytes] = []  #: STATUS payloads, oldest first
        #: Node -> the image this gateway installed there, as its driver then reported it
        #: (for drivers that cannot tell Shoal's facts; see :meth:`_installed_slot`).
        self._installed: dict[str, dict[str, Any]] = {}
        self._load()
        if config.hooks.folder is not None:
            found, problems = survey(config.hooks.folder)
            log.info("hooks in %s: %s", config.hooks.folder, ", ".join(found) or "none")
            for problem in problems:
                log.warning("hooks: %s", problem)

    def close(self) -> None:
        """Stop the workers that wait (for blocks, or to retry a hook); jobs stay on disk.

        Hooks still running are ended (SIGTERM, SIGKILL after
        ``hooks.KILL_GRACE_S``; this waits for that) and no more start: a hook
        runs in a session of its own and would outlive the gateway, its time
        limit no longer enforced, and run a second time after a restart. Their
        boundaries run again when the gateway does. A worker that is writing
        to its node finishes first; it is a daemon thread and ends with the
        process otherwise.
        """
        self._closing.set()
        with self._lock:
            for job in self.jobs.values():
                job.cancelled.set()
                job.inbox.put(None)
        self._hooks.close()

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

    # -- drivers and inventory -----------------------------------------------------

    def driver(self, name: str) -> NodeDriver:
        """The driver of node ``name``, made on first use.

        Raises the InvalidInput of a driver that cannot be had (not registered,
        does not import, bad options), every time it is asked for.
        """
        node = self._nodes[name]
        with self._drivers_lock:
            made = self._drivers.get(name)
            if made is None:
                try:
                    made = self._make_driver(node)
                except InvalidInput as exc:
                    log.error("node %s: %s", name, exc)
                    made = exc
                self._drivers[name] = made
        if isinstance(made, InvalidInput):
            raise made
        return made

    def inventory(self, only: str | None = None) -> Outgoing:
        """Ask each node (or one) what it runs, through its driver. Blocks on node I/O.

        A node busy with an update is skipped (its job reports it afterwards).
        """
        reports: list[dict[str, Any]] = []
        for name in sorted(self._nodes):
            if only is not None and name != only:
                continue
            lock = self._node_locks[name]
            if not lock.acquire(blocking=False):
                continue
            try:
                reports.append(self._node_report(name))
            finally:
                lock.release()
        return self._up(t.Up.INVENTORY), fleet.encode_map({"nodes": reports})

    def _node_report(self, name: str, installed: VerifiedArtifact | None = None) -> dict[str, Any]:
        """One node's INVENTORY entry, asked through its driver (the caller holds its lock).

        ``installed``: the artifact a job has just left running on the node.
        """
        try:
            found = self.driver(name).inventory()
        except (ShoalError, OSError) as exc:
            return {"node": name, "error": _bounded(str(exc))}
        except Exception as exc:  # a third-party driver's bug stays in its node's report
            log.exception("node %s: inventory failed", name)
            return {"node": name, "error": _bounded(f"driver crashed: {type(exc).__name__}: {exc}")}
        if found.device_type:
            self._device_types[name] = found.device_type
        primary = _slot(found)
        if primary is None:
            primary = self._installed_slot(name, found, installed)
        return {
            "node": name, "device_type": found.device_type or None,
            "boot_state": found.boot_state or None, "primary": primary,
        }  # fmt: skip

    def _installed_slot(
        self, name: str, found: NodeInventory, installed: VerifiedArtifact | None
    ) -> dict[str, Any] | None:
        """A node's ``primary`` from what this gateway installed, when its driver tells too little.

        Without it the orchestrator knows nothing of what such a node runs: no
        skip, no delta, no anti-rollback check. With ``installed`` (a job has
        just left the node running that artifact's image), the driver's report
        (version and boot state, with the node's driver and port) is recorded
        with the artifact's facts; otherwise the record stands for what runs
        only if the driver reports exactly that again. A different report gets
        None and keeps the record: a node may revert to that image. Two images of
        one version are told apart only by the driver's ``identity`` (SMP: the
        MCUboot hash); a driver without one makes them one to this check.
        """
        running = found.running
        if running is None:
            return None
        node = self._nodes[name]
        seen = {
            "driver": node.driver, "port": node.port, "version": running.version,
            "boot_state": found.boot_state or "",
            "identity": running.identity.hex() if running.identity else "",
        }  # fmt: skip
        with self._lock:
            if installed is not None:
                m = installed.manifest
                slot = {
                    "version": m.version, "sequence": m.sequence, "digest": m.image_digest,
                    "size": m.image_size,
                }  # fmt: skip
                self._installed[name] = {**seen, "slot": slot}
                self._save()
            known = self._installed.get(name)
        if known is None or any(known[key] != value for key, value in seen.items()):
            return None
        return dict(known["slot"])

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
                with self._lock:
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
                    job_or_none.cancelled.set()
                    job_or_none.inbox.put(None)
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
        return [j for j in self.jobs.values() if j.fetching and self._wanted(j).digest == digest]

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
        """Hand a complete, digest-checked artifact to the workers waiting for it.

        A digest mismatch starts the download again (the fetch it returns).
        """
        try:
            data = download.finish()
        except InvalidInput as exc:
            log.warning("%s", exc)
            return self._fetch(download, force=True)
        for job in self._jobs_fetching(download.ref.digest):
            job.fetching = False
            job.inbox.put(data)
        # The files stay until no job needs them: a restart mid-flash flashes again
        # from them (the node resumes at its own offset) instead of fetching again.
        self._downloads.pop(download.ref.digest, None)
        download.close()
        return []

    # -- jobs ----------------------------------------------------------------------

    def _start_workers(self) -> None:
        """One worker per node at a time (the caller holds the lock)."""
        for job in self.jobs.values():
            if job.worker or job.node in self._busy_nodes or job.node not in self._nodes:
                continue
            job.worker = True
            self._busy_nodes.add(job.node)
            # Without Download_Enter hooks there is nothing to wait for: fetch at once.
            job.download_open = job.fetching = not self._has_hooks(Phase.DOWNLOAD, When.ENTER)
            threading.Thread(
                target=self._work, args=(job,), name=f"job-{job.node}", daemon=True
            ).start()

    def _has_hooks(self, phase: Phase, when: When) -> bool:
        folder = self.config.hooks.folder
        if folder is None:
            return False
        try:
            return bool(find_hooks(folder, phase, when))
        except InvalidInput:
            return True  # the worker runs the boundary, which fails and says why

    def _work(self, job: Job) -> None:
        """One job from Download_Enter to its final report; see the module rules."""
        node = self._nodes[job.node]
        hooks = _JobHooks(self, job, node)
        final: tuple[str, str, int | None] | None = None
        touched = False  #: the node may have changed: report its inventory afterwards
        report: dict[str, Any] | None = None  #: the node's inventory, asked right after
        try:
            driver = self.driver(job.node)
            verified, image = self._download_phase(job, hooks)
            with self._node_locks[job.node]:
                result = driver.run_update(
                    verified, image, hooks=hooks, progress=self._progress_for(job)
                )
                final = (str(result.outcome), result.reason, result.bytes_sent)
                if result.outcome in (UpdateOutcome.SUCCEEDED, UpdateOutcome.ALREADY_INSTALLED):
                    # Before anything else may talk to the node, which runs this image now.
                    # (A disk that fails the record must not make the update a failure.)
                    with contextlib.suppress(OSError):
                        report = self._node_report(job.node, installed=verified)
        except UpdateCancelled:
            final = None  # reported by the cancel (or the agent is closing)
        except HookFailed as exc:
            final = ("failed", str(exc), None)
        except _Refused as exc:
            final = ("failed", f"artifact refused by the gateway: {exc}", None)
        except (DriverNotFound, DriverLoadError, DriverOptionError) as exc:
            final = ("failed", f"cannot drive node {job.node}: {exc}", None)
        except (ShoalError, OSError) as exc:
            final = ("failed", f"flashing failed: {exc}", None)
        except Exception as exc:  # a third-party driver's bug fails its job, not the gateway
            log.exception("node %s: driver %s crashed", job.node, node.driver)
            final = ("failed", f"node driver {node.driver!r} crashed: {type(exc).__name__}: {exc}",
                     None)  # fmt: skip
        finally:
            with self._lock:
                touched = job.flashing
                job.worker = job.download_open = job.fetching = job.flashing = False
                self._busy_nodes.discard(job.node)
                if final is not None and self.jobs.get(job.key) is job:
                    state, reason, sent = final
                    self._news.put(self._final(job, state, reason, serial_bytes=sent))
        if touched and final is not None:
            with contextlib.suppress(Exception):
                if report is None:
                    self._news.put(self.inventory(only=job.node))
                else:
                    inventory = fleet.encode_map({"nodes": [report]})
                    self._news.put((self._up(t.Up.INVENTORY), inventory))

    def _download_phase(self, job: Job, hooks: _JobHooks) -> tuple[VerifiedArtifact, bytes]:
        """Download_Enter, the fetch (done by the message loop), checks, Download_Leave.

        Raises _Refused for an artifact that fails verification, HookFailed,
        UpdateCancelled.
        """
        try:
            if not job.download_open:
                hooks.enter(Phase.DOWNLOAD)
                with self._lock:
                    if job.cancelled.is_set():
                        raise UpdateCancelled("cancelled")
                    job.download_open = job.fetching = True
            item = job.inbox.get()
            if item is None:
                raise UpdateCancelled("cancelled")
            if isinstance(item, Exception):
                raise item
            verified, image = self._verify(job, item)
            with self._lock:
                if self.jobs.get(job.key) is job:
                    self._news.put(self._status(job, "downloaded"))
            hooks.learn(verified, image)
            hooks.leave(Phase.DOWNLOAD)
        except Exception as exc:
            hooks.error(Phase.DOWNLOAD, str(exc))
            raise
        return verified, image

    def _verify(self, job: Job, artifact_bytes: bytes) -> tuple[VerifiedArtifact, bytes]:
        """Verify and rebuild; keep the image as a future delta base. Raises _Refused, OSError."""
        try:
            verified = verify_artifact(
                artifact_bytes, self.trusted, device_type=self._device_types.get(job.node)
            )
            base = None
            if verified.manifest.is_delta and verified.manifest.base_digest is not None:
                base = self._image_path(verified.manifest.base_digest).read_bytes()
            image = verified.rebuild_image(base)
        except (InvalidInput, OSError) as exc:
            raise _Refused(str(exc)) from exc
        self._image_path(verified.manifest.image_digest).write_bytes(image)
        return verified, image

    def _progress_for(self, job: Job) -> ProgressFn:
        last: dict[str, Any] = {"state": "", "at": 0.0}

        def progress(p: InstallProgress) -> None:
            # A report on every change of state, and while flashing one a second
            # with the bytes the node has taken (for progress bars).
            now = self._clock()
            state = str(p.state)
            if state == last["state"] and now - last["at"] < PROGRESS_REPORT_S:
                return
            last["state"], last["at"] = state, now
            with self._lock:
                job.flashing = True  # a driver that reports progress is at the node
                if self.jobs.get(job.key) is job:
                    self._news.put(
                        self._status(job, state, bytes_done=p.bytes_done, total=p.bytes_total)
                    )

        return progress

    def _may_write(self, job: Job) -> None:
        """The point of no return: from here on the job may write to its node.

        Raises UpdateCancelled when a cancel came first.
        """
        with self._lock:
            if job.cancelled.is_set():
                raise UpdateCancelled("cancelled")
            job.flashing = True

    def _defer(self, job: Job, boundary: str, attempt: int, reason: str) -> None:
        """Record and report that a hook asked to retry ``boundary`` later."""
        with self._lock:
            job.hook_attempts[boundary] = attempt
            if self.jobs.get(job.key) is not job or job.cancelled.is_set():
                return
            if job.state != "deferred":
                job.resume_state = job.state
            job.reason = reason
            self._news.put(self._status(job, "deferred"))

    def _passed(self, job: Job, boundary: str) -> None:
        """A boundary's hooks passed: forget its retries, and report the job going on."""
        with self._lock:
            if job.hook_attempts.pop(boundary, None) is None:
                return
            if job.state == "deferred" and self.jobs.get(job.key) is job:
                job.reason = ""
                self._news.put(self._status(job, job.resume_state or "downloading"))
            else:
                self._save()

    # -- timers ----------------------------------------------------------------

    def tick(self) -> list[Outgoing]:
        """News from workers, workers to start, downloads to start or re-request."""
        out: list[Outgoing] = []
        while True:
            try:
                out.append(self._news.get_nowait())
            except queue.Empty:
                break
        now = self._clock()
        with self._lock:
            if not self._closing.is_set():
                self._start_workers()
            for job in list(self.jobs.values()):
                if not job.fetching:
                    continue
                ref = self._wanted(job)
                download = self._downloads.get(ref.digest)
                if download is None:
                    try:
                        download = Download(self._data / "downloads", ref)
                    except InvalidInput as exc:
                        job.fetching = False
                        job.inbox.put(_Refused(str(exc)))
                        continue
                    self._downloads[ref.digest] = download
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
            "bytes": bytes_done, "total": total, "reason": _bounded(job.reason) or None,
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
            "installed": self._installed,
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
            installed = _installed_records(raw.get("installed") or {})
            self._installed = {k: v for k, v in installed.items() if k in self._nodes}
            for item in raw["jobs"]:
                job = Job.from_map(item)
                # Interrupted anywhere: start again from the download (it resumes from
                # disk); the node resumes the transfer at its own offset.
                job.state = "downloading"
                self.jobs[job.key] = job
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{path} is damaged: {exc}") from exc

    def seen_images(self) -> set[str]:
        """Hex digests of the images this gateway can use as delta bases."""
        return {p.stem for p in (self._data / "images").glob("*.bin")}

    def image_digest_ok(self, digest: bytes) -> bool:
        path = self._image_path(digest)
        return path.exists() and hashlib.sha256(path.read_bytes()).digest() == digest


class _JobHooks:
    """The state hooks of one job: the :class:`~gateway_proxy.drivers.PhaseHooks` of its driver.

    Runs in the job's worker thread. A retry-later is waited out here (on the
    job's cancel event, so a cancel ends the wait at once), counted per
    boundary across restarts, and capped by ``hooks.max_attempts``.
    """

    def __init__(self, agent: GatewayAgent, job: Job, node: NodePort) -> None:
        self._agent = agent
        self._job = job
        self._node = node
        self._facts = {
            "SHOAL_ARTIFACT_NAME": "", "SHOAL_ARTIFACT_VERSION": "",
            "SHOAL_ARTIFACT_SEQUENCE": "", "SHOAL_IMAGE_SHA256": "", "SHOAL_IMAGE_BYTES": "",
        }  # fmt: skip

    def learn(self, verified: VerifiedArtifact, image: bytes) -> None:
        """The artifact's facts, for the hooks from Download_Leave on."""
        m = verified.manifest
        self._facts.update({
            "SHOAL_ARTIFACT_NAME": m.name, "SHOAL_ARTIFACT_VERSION": m.version,
            "SHOAL_ARTIFACT_SEQUENCE": str(m.sequence),
            "SHOAL_IMAGE_SHA256": m.image_digest.hex(), "SHOAL_IMAGE_BYTES": str(len(image)),
        })  # fmt: skip

    def environment(
        self, phase: Phase, when: When, attempt: int, error: str = ""
    ) -> dict[str, str]:
        """The gateway's environment with the job's facts on top (docs/drivers-and-hooks.md).

        ``SHOAL_*`` variables the gateway itself was started with are left out:
        under that prefix a hook sees exactly the facts of its job.
        """
        agent, job, node = self._agent, self._job, self._node
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(self._facts)
        env.update({
            "SHOAL_GATEWAY": agent.config.gateway_id, "SHOAL_DEPLOYMENT": job.deployment,
            "SHOAL_NODE": job.node, "SHOAL_DRIVER": node.driver, "SHOAL_PORT": node.port,
            "SHOAL_DEVICE_TYPE": agent._device_types.get(job.node, ""),
            "SHOAL_PHASE": phase.value.lower(), "SHOAL_WHEN": when.value.lower(),
            "SHOAL_ATTEMPT": str(attempt),
            "SHOAL_MAX_ATTEMPTS": str(agent.config.hooks.max_attempts),
            "SHOAL_ARTIFACT_SHA256": agent._wanted(job).digest.hex(),
            "SHOAL_ERROR": error,
        })  # fmt: skip
        return env

    def enter(self, phase: Phase) -> None:
        self._boundary(phase, When.ENTER)
        if phase is not Phase.DOWNLOAD:
            self._agent._may_write(self._job)

    def leave(self, phase: Phase) -> None:
        self._boundary(phase, When.LEAVE)

    def error(self, phase: Phase, reason: str) -> None:
        if self._agent._closing.is_set():
            return  # not an error: the job goes on after the restart
        try:
            self._agent._hooks.run_errors(phase, self.environment(phase, When.ERROR, 1, reason))
        except Exception:  # error hooks never change the outcome
            log.exception("node %s: %s error hooks", self._job.node, phase)

    def _boundary(self, phase: Phase, when: When) -> None:
        """Run one boundary's hooks to a pass. Raises HookFailed, UpdateCancelled."""
        agent, job = self._agent, self._job
        config = agent.config.hooks
        boundary = hook_name(phase, when)
        start = 0
        while True:
            if job.cancelled.is_set():
                raise UpdateCancelled("cancelled")
            attempt = job.hook_attempts.get(boundary, 0) + 1
            result = agent._hooks.run(
                phase, when, self.environment(phase, when, attempt), start=start
            )
            if result.verdict is Verdict.PASSED:
                agent._passed(job, boundary)
                return
            if result.verdict is Verdict.STOPPED:
                raise UpdateCancelled("the gateway is closing")
            if result.verdict is Verdict.FAILED:
                raise HookFailed(result.reason)
            said = last_line(result.output)
            if attempt >= config.max_attempts:
                raise HookFailed(
                    f"hook {result.hook} asked to retry later {attempt} times, the most "
                    f"hooks.max_attempts allows: giving up" + (f": {said}" if said else "")
                )
            agent._defer(
                job, boundary, attempt,
                f"hook {result.hook} asked to retry later (attempt {attempt} of "
                f"{config.max_attempts}); next try in {config.retry_delay_s:g} s"
                + (f": {said}" if said else ""),
            )  # fmt: skip
            start = result.index
            if job.cancelled.wait(config.retry_delay_s):
                raise UpdateCancelled("cancelled")


def _slot(found: NodeInventory) -> dict[str, Any] | None:
    """The INVENTORY ``primary`` map, when the driver knows all it needs."""
    running = found.running
    if (
        running is None
        or running.sequence is None
        or running.image_sha256 is None
        or running.image_bytes is None
    ):
        return None
    return {
        "version": running.version, "sequence": running.sequence,
        "digest": running.image_sha256, "size": running.image_bytes,
    }  # fmt: skip


def _installed_records(raw: Any) -> dict[str, dict[str, Any]]:
    """The ``installed`` map of ``agent.cbor``, checked. Raises TypeError when damaged."""
    if not isinstance(raw, dict):
        raise TypeError("installed must be a map")
    records: dict[str, dict[str, Any]] = {}
    for name, record in raw.items():
        slot = record.get("slot") if isinstance(record, dict) else None
        if not (
            isinstance(name, str)
            and isinstance(record, dict)
            and all(isinstance(record.get(k), str) for k in ("driver", "port", "version"))
            and isinstance(record.get("boot_state"), str)
            and isinstance(slot, dict)
            and isinstance(slot.get("version"), str)
            and all(_is_uint(slot.get(k)) for k in ("sequence", "size"))
            and isinstance(slot.get("digest"), bytes)
        ):
            raise TypeError(f"installed[{str(name)[:64]!r}] is not an installed-image record")
        records[name] = dict(record)
    return records


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bounded(reason: str) -> str:
    """A reason cut to what a STATUS carries, keeping its start (which names the cause)."""
    data = reason.encode()
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
