"""Real simulated nodes for integration tests: flash files, ptys, threads and processes.

Every helper cleans up what it started: threads are stopped and joined,
processes are terminated by their own id, ptys and flash files are closed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cbor2

from mcu_firmware_stub.flash import FlashFaults, FlashTiming
from mcu_firmware_stub.node import NodeConfig, SimulatedNode
from mcu_firmware_stub.node import NodeThread as ServingNode
from otaio.serial_link import PtyLink
from otaproto import cbor
from otaproto.artifact import VerifiedArtifact, build_full_artifact, verify_artifact
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import evolve, firmware_like

DEVICE = "nrf52840"
KEY = SigningKey.from_ed25519_seed(bytes(range(32)))
TRUST = TrustedKeys([KEY.public_key])


def make_artifact(
    image: bytes, version: str, sequence: int, key: SigningKey = KEY, *, name: str = "app",
    device_type: str = DEVICE,
) -> VerifiedArtifact:  # fmt: skip
    data = build_full_artifact(
        image, name=name, version=version, sequence=sequence, device_types=(device_type,),
        key=key, created_s=0,
    )  # fmt: skip
    return verify_artifact(data, TrustedKeys([key.public_key]))


@dataclass(frozen=True)
class Images:
    old: VerifiedArtifact
    new: VerifiedArtifact


def images(size_bytes: int) -> Images:
    old = firmware_like(size_bytes, seed=11)
    new = evolve(old, seed=12, insert_bytes=256)[:size_bytes]
    return Images(make_artifact(old, "1.0.0", 1), make_artifact(new, "2.0.0", 2))


def node_config(state: Path, **overrides: object) -> NodeConfig:
    values: dict[str, object] = {
        "state_dir": state, "device_type": DEVICE, "trusted": TRUST, "slot_bytes": 64 * 1024,
        "page_bytes": 4096, "chunk_bytes": 1024, "window_frames": 4,
        "timing": FlashTiming.off(), "faults": FlashFaults(),
    }  # fmt: skip
    values.update(overrides)
    return NodeConfig(**values)  # type: ignore[arg-type]


class NodeThread(ServingNode):
    """A simulated node on a new pty, served from a thread; ``path`` is the gateway's end."""

    def __init__(self, node: SimulatedNode) -> None:
        link = PtyLink()
        self.path = link.path
        super().__init__(node, link)


@contextmanager
def node_on_pty(config: NodeConfig, initial: VerifiedArtifact | None) -> Iterator[NodeThread]:
    thread = NodeThread(SimulatedNode(config, initial=initial))
    try:
        yield thread
    finally:
        thread.stop()


def artifact_file(folder: Path, artifact: VerifiedArtifact, name: str) -> Path:
    """The artifact's container bytes, rebuilt from its verified parts, in a file."""
    path = folder / name
    signed = cbor2.loads(artifact.signed_manifest)
    path.write_bytes(b"\xd9\xd9\xf7" + cbor.encode([1, signed, artifact.payload]))
    return path


def write_keys(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "release.pub").write_bytes(KEY.public_key.to_pem())
    (folder / "release.key").write_bytes(KEY.to_pem())
    return folder


def shoal(*args: str) -> list[str]:
    """The argv of a ``shoal`` subcommand run by this interpreter."""
    return [sys.executable, "-m", "shoal.cli", *args]


@contextmanager
def process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process; terminate (then kill) exactly it at the end."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
