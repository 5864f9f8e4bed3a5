"""The ``shoal`` command: thin click commands over library calls.

Every command turns Shoal's own errors into one line on stderr and exit
status 1 (no traceback); click's usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from click_default_group import DefaultGroup

from otaio.files import read_bounded, write_atomic
from otaproto.artifact import (
    DEFAULT_MAX_DELTA_RATIO,
    MAGIC,
    ArtifactInfo,
    VerifiedArtifact,
    build_delta_artifact,
    build_full_artifact,
    inspect_artifact,
    verify_artifact,
)
from otaproto.errors import LinkError, UsageError
from otaproto.images import is_hex_name, load_image
from otaproto.keys import Algorithm, PublicKey, SigningKey, TrustedKeys
from otaproto.limits import DEFAULT_LIMITS
from otaproto.manifest import Manifest
from shoal.cli_common import Client, ShoalGroup, operator_options, show

KEY_FILE_LIMIT_BYTES = 16 * 1024
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
TRUST_OPTION = click.option(
    "--trust", "trust", required=True, multiple=True, type=EXISTING_FILE,
    help="Trusted public key (repeat for several).",
)  # fmt: skip
BASE_OPTION = click.option(
    "--base", "base", type=EXISTING_FILE,
    help="For a delta: the base image (.bin/.hex) or its full artifact.",
)  # fmt: skip


@click.group(cls=ShoalGroup)
@click.version_option(package_name="shoal")
def main() -> None:
    """Shoal: over-the-air updates for MCU fleets behind gateways."""


# --- keys -------------------------------------------------------------------


@main.group(cls=ShoalGroup)
def keys() -> None:
    """Release signing keys."""


@keys.command("generate")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for NAME.key (private, mode 0600) and NAME.pub.",
)
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in Algorithm]),
    default="ed25519",
    show_default=True,
    help="Signature algorithm.",
)
@click.option("--name", default="release", show_default=True, help="Base name of the key files.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keys_generate(out_dir: Path, algorithm: str, name: str, force: bool) -> None:
    """Generate a release key pair."""
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force and (private_path.exists() or public_path.exists()):
        raise UsageError(f"{private_path} or {public_path} exists (use --force to replace)")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate(Algorithm(algorithm))
    write_atomic(private_path, key.to_pem(), mode=0o600)
    write_atomic(public_path, key.public_key.to_pem(), mode=0o644)
    click.echo(
        f"{private_path} (private, {algorithm}), {public_path} "
        f"(key id {key.public_key.key_id.hex()})"
    )


# --- artifact ---------------------------------------------------------------


@main.group(cls=ShoalGroup)
def artifact() -> None:
    """Build, inspect, verify and extract signed firmware artifacts."""


def _load_signing_key(path: Path) -> SigningKey:
    return SigningKey.from_pem(read_bounded(path, KEY_FILE_LIMIT_BYTES, "key file"))


def _load_trust(paths: Sequence[Path]) -> TrustedKeys:
    return TrustedKeys(
        [PublicKey.from_pem(read_bounded(p, KEY_FILE_LIMIT_BYTES, "key file")) for p in paths]
    )


def _read_artifact(path: Path) -> bytes:
    return read_bounded(path, DEFAULT_LIMITS.max_artifact_bytes, "artifact")


def _read_image(path: Path) -> bytes:
    intel_hex = is_hex_name(path.name)
    limit = DEFAULT_LIMITS.max_hex_file_bytes if intel_hex else DEFAULT_LIMITS.max_image_bytes
    return load_image(read_bounded(path, limit, "image"), intel_hex=intel_hex)


def _base_image(path: Path | None, trusted: TrustedKeys) -> bytes | None:
    """A base given as an image file or as a (full) artifact verified with ``trusted``."""
    if path is None:
        return None
    data = read_bounded(path, DEFAULT_LIMITS.max_artifact_bytes, "base")
    if data.startswith(MAGIC):
        base = verify_artifact(data, trusted)
        if base.manifest.is_delta:
            raise UsageError("--base must be an image or a full artifact, not a delta")
        return base.payload
    return load_image(data, intel_hex=is_hex_name(path.name))


def _now_s() -> int:
    """Creation time; SOURCE_DATE_EPOCH makes builds reproducible."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        if not epoch.isdigit():
            raise UsageError("SOURCE_DATE_EPOCH must be a whole number of seconds")
        return int(epoch)
    return int(time.time())


def _parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta wants KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


@artifact.command("build")
@click.argument("image", type=EXISTING_FILE)
@click.option("--version", "version", required=True, help="Version string, e.g. 1.4.2.")
@click.option(
    "--seq",
    "sequence",
    required=True,
    type=click.IntRange(0, 2**64 - 1),
    help="Sequence number; nodes refuse anything not newer than what they run.",
)
@click.option(
    "--device-type",
    "device_types",
    required=True,
    multiple=True,
    help="Compatible device type (repeat for several).",
)
@click.option("--key", "key_path", required=True, type=EXISTING_FILE, help="Private release key.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Artifact name (default: the image file's stem).")
@click.option("--meta", multiple=True, help="Free-form metadata KEY=VALUE (repeatable).")
def artifact_build(
    image: Path,
    version: str,
    sequence: int,
    device_types: tuple[str, ...],
    key_path: Path,
    out: Path,
    name: str | None,
    meta: tuple[str, ...],
) -> None:
    """Sign IMAGE (raw .bin, Intel .hex, or an imgtool-signed MCUboot image) as an artifact."""
    key = _load_signing_key(key_path)
    data = build_full_artifact(
        _read_image(image),
        name=name or image.stem,
        version=version,
        sequence=sequence,
        device_types=device_types,
        key=key,
        created_s=_now_s(),
        metadata=_parse_metadata(meta),
    )
    write_atomic(out, data)
    click.echo(f"{out}: full artifact, {len(data)} bytes")


@artifact.command("delta")
@click.argument("base_artifact", type=EXISTING_FILE)
@click.argument("target_artifact", type=EXISTING_FILE)
@click.option("--key", "key_path", required=True, type=EXISTING_FILE, help="Private release key.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=EXISTING_FILE,
    help="Keys the two inputs are checked with (default: the public half of --key).",
)
@click.option(
    "--max-ratio",
    default=DEFAULT_MAX_DELTA_RATIO,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Build the full artifact instead when the patch is larger than this share.",
)
def artifact_delta(
    base_artifact: Path,
    target_artifact: Path,
    key_path: Path,
    out: Path,
    trust: tuple[Path, ...],
    max_ratio: float,
) -> None:
    """Build a bsdiff4 delta artifact from BASE_ARTIFACT to TARGET_ARTIFACT."""
    key = _load_signing_key(key_path)
    trusted = _load_trust(trust) if trust else TrustedKeys([key.public_key])
    base = verify_artifact(_read_artifact(base_artifact), trusted)
    target = verify_artifact(_read_artifact(target_artifact), trusted)
    outcome = build_delta_artifact(base, target, key, created_s=_now_s(), max_ratio=max_ratio)
    write_atomic(out, outcome.artifact)
    if outcome.used_delta:
        click.echo(
            f"{out}: delta {base.manifest.version} -> {target.manifest.version}, "
            f"{len(outcome.artifact)} bytes ({outcome.ratio:.1%} of the image)"
        )
    else:
        click.echo(
            f"{out}: the delta would be {outcome.ratio:.1%} of the image (over "
            f"{max_ratio:.0%}), so this is the full artifact, {len(outcome.artifact)} bytes"
        )


def _manifest_json(m: Manifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "device_types": list(m.device_types),
        "image_size": m.image_size,
        "image_sha256": m.image_digest.hex(),
        "payload_kind": str(m.payload_kind),
        "payload_size": m.payload_size,
        "payload_sha256": m.payload_digest.hex(),
        "base_sha256": m.base_digest.hex() if m.base_digest else None,
        "base_version": m.base_version,
        "created": m.created_s,
        "metadata": dict(m.metadata),
    }


@artifact.command("inspect")
@click.argument("file", type=EXISTING_FILE)
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=EXISTING_FILE,
    help="Also check the signature with these keys.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def artifact_inspect(file: Path, trust: tuple[Path, ...], as_json: bool) -> None:
    """Show what an artifact contains; says whether its signature was checked."""
    data = _read_artifact(file)
    info: ArtifactInfo = inspect_artifact(data)
    if trust:
        verify_artifact(data, _load_trust(trust))
    report = {
        **_manifest_json(info.manifest),
        "artifact_size": info.artifact_size,
        "algorithm": str(info.algorithm),
        "key_id": info.key_id.hex(),
        "signature_checked": bool(trust),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for field, value in report.items():
        click.echo(f"{field:18} {value}")
    if not trust:
        click.echo("signature NOT checked (give --trust to check it)")


@artifact.command("verify")
@click.argument("file", type=EXISTING_FILE)
@TRUST_OPTION
@BASE_OPTION
@click.option("--device-type", default=None, help="Refuse unless the artifact is for this type.")
@click.option(
    "--installed-seq",
    type=click.IntRange(0, 2**64 - 1),
    default=None,
    help="Refuse unless the sequence number is newer than this.",
)
def artifact_verify(
    file: Path,
    trust: tuple[Path, ...],
    base: Path | None,
    device_type: str | None,
    installed_seq: int | None,
) -> None:
    """Verify an artifact: exit 0 when valid, else exit 1 naming what failed."""
    trusted = _load_trust(trust)
    verified = verify_artifact(
        _read_artifact(file), trusted, device_type=device_type, installed_sequence=installed_seq
    )
    m = verified.manifest
    note = ""
    if m.is_delta:
        base_image = _base_image(base, trusted)
        if base_image is None:
            note = " (delta not applied: give --base to check the rebuilt image)"
        else:
            verified.rebuild_image(base_image)
            note = f" (rebuilt from {m.base_version}: image digest matches)"
    click.echo(
        f"valid: {m.name} {m.version} seq {m.sequence} {m.payload_kind}, "
        f"key {verified.key_id.hex()}{note}"
    )


@artifact.command("extract")
@click.argument("file", type=EXISTING_FILE)
@TRUST_OPTION
@BASE_OPTION
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def artifact_extract(file: Path, trust: tuple[Path, ...], base: Path | None, out: Path) -> None:
    """Verify an artifact and write the full firmware image, applying a delta."""
    trusted = _load_trust(trust)
    verified: VerifiedArtifact = verify_artifact(_read_artifact(file), trusted)
    image = verified.rebuild_image(_base_image(base, trusted))
    write_atomic(out, image)
    click.echo(f"{out}: {verified.manifest.version}, {len(image)} bytes")


# --- serial: flash, mcu-sim, wire -------------------------------------------

#: ``shoal flash`` exit statuses (documented in docs/serial-protocol.md).
EXIT_OK = 0
EXIT_INVALID = 1
EXIT_REJECTED = 3
EXIT_ROLLED_BACK = 4
EXIT_LINK_LOST = 5
#: ``shoal mcu-sim`` exits with this when a fault knob cut its power.
EXIT_POWER_CUT = 75


@main.command("flash")
@click.option("--port", required=True, help="Serial port: /dev/ttyUSB0, a pty path, socket://h:p.")
@click.option("--artifact", "artifact_path", required=True, type=EXISTING_FILE)
@TRUST_OPTION
@BASE_OPTION
@click.option("--baud", default=115200, show_default=True, type=click.IntRange(300, 20_000_000))
@click.option("--no-test-boot", is_flag=True, help="Stop once the node verified the image.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, no progress bar.")
def flash(
    port: str,
    artifact_path: Path,
    trust: tuple[Path, ...],
    base: Path | None,
    baud: int,
    no_test_boot: bool,
    as_json: bool,
) -> None:
    """Update one node over serial: verify, rebuild, transfer, test-boot, confirm.

    Exit 0 when the node runs and has confirmed the new image (or already did),
    1 for a bad artifact, 3 when the node refused it, 4 when it rolled back,
    5 when the port cannot be opened or the link was lost.
    """
    from gateway_proxy.serial_driver import Progress, config_for_baud, flash_node
    from otaio.serial_link import SerialLink
    from otaproto.node_sender import UpdateState

    trusted = _load_trust(trust)
    verified = verify_artifact(_read_artifact(artifact_path), trusted)
    image = verified.rebuild_image(_base_image(base, trusted))
    config = config_for_baud(baud, test_boot=not no_test_boot)

    def open_link() -> SerialLink:
        return SerialLink(port, baud=baud)

    try:
        SerialLink(port, baud=baud).close()
    except LinkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_LINK_LOST)
    if as_json:
        report = flash_node(open_link, verified, image, config=config)
    else:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        with Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(f"{verified.manifest.version} -> {port}", total=len(image))

            def show(p: Progress) -> None:
                bar.update(task, completed=p.acked_bytes, description=f"{p.state:>10}")

            report = flash_node(open_link, verified, image, config=config, progress=show)
    outcome = {
        "state": str(report.state),
        "reason": report.reason,
        "image_bytes": report.image_bytes,
        "data_bytes_sent": report.data_bytes_sent,
        "resent_bytes": report.resent_bytes,
        "resumed_from": report.resumed_from,
        "link_reopens": report.link_reopens,
        "seconds_to_verified": report.seconds_to_verified,
        "seconds_total": report.seconds_total,
    }
    click.echo(json.dumps(outcome) if as_json else f"{report.state}: {report.reason}")
    codes = {
        UpdateState.SUCCEEDED: EXIT_OK,
        UpdateState.ALREADY_INSTALLED: EXIT_OK,
        UpdateState.VERIFIED: EXIT_OK,
        UpdateState.REJECTED: EXIT_REJECTED,
        UpdateState.ROLLED_BACK: EXIT_ROLLED_BACK,
    }
    sys.exit(codes.get(report.state, EXIT_LINK_LOST))


@main.command("mcu-sim")
@click.option("--port", default=None, help="Serial port to serve (a pty path, /dev/tty*...).")
@click.option("--pty", "make_pty", is_flag=True, help="Create a pty and print its path.")
@click.option(
    "--protocol",
    type=click.Choice(["shoal", "smp"]),
    default="shoal",
    show_default=True,
    help="Shoal's serial protocol, or SMP (mcumgr) over MCUboot slots as Zephyr devices speak.",
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the node keeps its flash; the node survives restarts with it.",
)
@click.option("--device-type", default=None, help="Device type provisioned into the node (shoal).")
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=EXISTING_FILE,
    help="Public key provisioned into the node (shoal; repeat for several).",
)
@click.option(
    "--initial-artifact",
    type=EXISTING_FILE,
    default=None,
    help="Full artifact programmed into an empty primary slot at first start (shoal).",
)
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    type=EXISTING_FILE,
    help="imgtool key (PEM or DER, public or key pair) MCUboot trusts (smp; repeatable).",
)
@click.option(
    "--accept-hash-only", is_flag=True, help="Also boot MCUboot images with no signature (smp)."
)
@click.option(
    "--initial-image",
    type=EXISTING_FILE,
    default=None,
    help="MCUboot image programmed into an empty primary slot at first start (smp).",
)
@click.option(
    "--smp-buf-size",
    default=2048,
    show_default=True,
    type=click.IntRange(256, 65535),
    help="Reassembly buffer advertised in mcumgr params (smp).",
)
@click.option(
    "--smp-buf-count", default=4, show_default=True, type=click.IntRange(1, 64), help="(smp)"
)
@click.option(
    "--smp-framing",
    type=click.Choice(["console", "raw"]),
    default="console",
    show_default=True,
    help="SMP over console (base64 lines, with log output) or raw (smp).",
)
@click.option("--slot-kib", default=512, show_default=True, type=click.IntRange(8, 16384))
@click.option("--page-bytes", default=4096, show_default=True, type=click.IntRange(256, 65536))
@click.option("--chunk-bytes", default=1024, show_default=True, type=click.IntRange(4, 4096))
@click.option("--window", "window_frames", default=4, show_default=True, type=click.IntRange(1, 32))
@click.option(
    "--flash-timing/--no-flash-timing",
    default=True,
    show_default=True,
    help="Model nRF52840 flash times (4 KiB erase 85 ms, word write 41 us).",
)
@click.option("--erase-slowdown", default=1.0, show_default=True, type=click.FloatRange(1.0, 1000))
@click.option(
    "--cut-after-ops",
    default=None,
    type=click.IntRange(0, None),
    help="Cut the power after this many flash operations (exit 75).",
)
@click.option(
    "--random-cut",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Probability of a power cut at each flash operation.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random cuts.")
@click.option(
    "--fail-self-test",
    multiple=True,
    help="Version whose self-test fails after a test boot (repeatable).",
)
def mcu_sim(
    port: str | None,
    make_pty: bool,
    protocol: str,
    state_dir: Path,
    device_type: str | None,
    trust: tuple[Path, ...],
    initial_artifact: Path | None,
    trust_keys: tuple[Path, ...],
    accept_hash_only: bool,
    initial_image: Path | None,
    smp_buf_size: int,
    smp_buf_count: int,
    smp_framing: str,
    slot_kib: int,
    page_bytes: int,
    chunk_bytes: int,
    window_frames: int,
    flash_timing: bool,
    erase_slowdown: float,
    cut_after_ops: int | None,
    random_cut: float,
    seed: int,
    fail_self_test: tuple[str, ...],
) -> None:
    """Run one simulated MCU node on a serial port or a new pty.

    With --protocol smp the node speaks SMP (mcumgr: OS and image groups) and
    boots MCUboot images signed by a --trust-key, as a Zephyr device does.
    """
    from mcu_firmware_stub.flash import FlashFaults, FlashTiming, PowerCut
    from mcu_firmware_stub.node import NodeConfig, SimulatedNode
    from otaio.serial_link import Link, PtyLink, SerialLink

    if (port is None) == (not make_pty):
        raise UsageError("give exactly one of --port PATH or --pty")
    smp_only = {
        "--trust-key": bool(trust_keys),
        "--accept-hash-only": accept_hash_only,
        "--initial-image": initial_image is not None,
    }
    shoal_only = {
        "--trust": bool(trust),
        "--device-type": device_type is not None,
        "--initial-artifact": initial_artifact is not None,
        "--fail-self-test": bool(fail_self_test),
    }
    not_for = smp_only if protocol == "shoal" else shoal_only
    wrong = [name for name, given in not_for.items() if given]
    if wrong:
        raise click.UsageError(f"not for --protocol {protocol}: {', '.join(wrong)}")
    timing = FlashTiming() if flash_timing else FlashTiming.off()
    faults = FlashFaults(
        cut_after_ops=cut_after_ops,
        random_cut_probability=random_cut,
        erase_slowdown=erase_slowdown,
        torn_writes=True,
        seed=seed,
    )

    def log(line: str) -> None:
        click.echo(f"mcu-sim: {line}", err=True)

    node: Any
    if protocol == "smp":
        from mcu_firmware_stub.smp_node import Framing, SmpNode, SmpNodeConfig
        from otaproto.mcuboot import ImageKey, ImageTrust

        if not trust_keys and not accept_hash_only:
            raise click.UsageError("--protocol smp needs --trust-key or --accept-hash-only")
        image_trust = ImageTrust(
            tuple(
                ImageKey.from_bytes(read_bounded(path, KEY_FILE_LIMIT_BYTES, "key file"))
                for path in trust_keys
            ),
            accept_hash_only=accept_hash_only,
        )
        smp_config = SmpNodeConfig(
            state_dir=state_dir,
            trust=image_trust,
            slot_bytes=slot_kib * 1024,
            page_bytes=page_bytes,
            buf_size=smp_buf_size,
            buf_count=smp_buf_count,
            framing=Framing(smp_framing),
            timing=timing,
            faults=faults,
        )
        first_image = (
            read_bounded(initial_image, DEFAULT_LIMITS.max_image_bytes, "image")
            if initial_image
            else None
        )
    else:
        if not trust or device_type is None:
            raise click.UsageError("--protocol shoal needs --device-type and --trust")
        trusted = _load_trust(trust)
        initial = (
            verify_artifact(_read_artifact(initial_artifact), trusted) if initial_artifact else None
        )
        config = NodeConfig(
            state_dir=state_dir,
            device_type=device_type,
            trusted=trusted,
            slot_bytes=slot_kib * 1024,
            page_bytes=page_bytes,
            chunk_bytes=chunk_bytes,
            window_frames=window_frames,
            timing=timing,
            faults=faults,
            fail_self_test=frozenset(fail_self_test),
        )

    try:
        if protocol == "smp":
            node = SmpNode(smp_config, initial_image=first_image, log=log)
        else:
            node = SimulatedNode(config, initial=initial, log=log)
        link: Link = PtyLink() if make_pty else SerialLink(port or "")
        if isinstance(link, PtyLink):
            click.echo(link.path)
        else:
            click.echo(port)
        sys.stdout.flush()
        node.run(link)
    except PowerCut:
        log("power cut")
        sys.exit(EXIT_POWER_CUT)
    except KeyboardInterrupt:
        sys.exit(0)


@main.command("wire")
@click.option("--baud", default=115200, show_default=True, type=click.IntRange(300, 20_000_000))
@click.option(
    "--ber", "bit_error_rate", default=0.0, show_default=True, type=float, help="Bit error rate."
)
@click.option("--drop-rate", default=0.0, show_default=True, type=float, help="Byte drop rate.")
@click.option(
    "--noise-rate", default=0.0, show_default=True, type=float, help="Noise bursts per second."
)
@click.option(
    "--disconnect-after",
    default=None,
    type=click.IntRange(1, None),
    help="Bytes after which the line goes dead.",
)
@click.option("--seed", default=0, show_default=True, type=int)
def wire(
    baud: int,
    bit_error_rate: float,
    drop_rate: float,
    noise_rate: float,
    disconnect_after: int | None,
    seed: int,
) -> None:
    """Join two new ptys at a baud rate (a UART for tests): prints both paths, runs until ^C."""
    import threading

    from otaio.wire import PacedWire, WireConfig

    config = WireConfig(
        baud=baud,
        bit_error_rate=bit_error_rate,
        drop_byte_rate=drop_rate,
        noise_burst_rate_hz=noise_rate,
        disconnect_after_bytes=disconnect_after,
        seed=seed,
    )
    with PacedWire(config) as paced:
        click.echo(f"{paced.a_path} {paced.b_path}")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


# --- fleet: serve, gateway, devices, upload, deploy ----------------------------


def _run_async(main_coro: Any) -> None:
    """Run a service until Ctrl-C or SIGTERM, then let it stop cleanly."""
    import asyncio
    import signal

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main_coro(stop)

    asyncio.run(runner())


@main.command("serve")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the orchestrator's SQLite file and artifact store.",
)
@click.option(
    "--trust",
    "trust",
    required=True,
    multiple=True,
    type=EXISTING_FILE,
    help="Release public key artifacts must be signed with (repeatable).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Broker address.")
@click.option(
    "--port",
    default=1883,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Broker port (0 = any free port, printed).",
)
@click.option(
    "--external",
    is_flag=True,
    help="Use a broker already running at --host/--port instead of the embedded one.",
)
@click.option("--tls-cert", type=EXISTING_FILE, default=None, help="Embedded broker: TLS cert.")
@click.option("--tls-key", type=EXISTING_FILE, default=None, help="Embedded broker: TLS key.")
@click.option(
    "--tls-ca",
    "tls_ca_file",
    type=EXISTING_FILE,
    default=None,
    help="With --external: the CA that signed the broker's TLS certificate (enables TLS).",
)
@click.option(
    "--websocket-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Embedded broker: also listen for MQTT over websockets.",
)
def serve_command(
    data_dir: Path,
    trust: tuple[Path, ...],
    host: str,
    port: int,
    external: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca_file: Path | None,
    websocket_port: int | None,
) -> None:
    """Run the orchestrator (and the embedded MQTT broker) until Ctrl-C."""
    import logging

    from broker.embedded import TlsFiles
    from shoal.serve import ServeOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    data_dir.mkdir(parents=True, exist_ok=True)
    options = ServeOptions(
        data_dir=data_dir,
        trusted=_load_trust(trust),
        host=host,
        port=port,
        embedded=not external,
        tls=TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None,
        websocket_port=websocket_port,
        tls_ca_file=tls_ca_file,
    )

    def ready(bound_port: int) -> None:
        click.echo(
            f"shoal: orchestrator up, MQTT on {host}:{bound_port}; operator 'admin', "
            f"secret in {data_dir / 'admin.secret'}"
        )
        sys.stdout.flush()

    _run_async(lambda stop: serve(options, stop, ready))


@main.command("gateway")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=EXISTING_FILE,
    help="gateway.toml (see examples/gateway.toml).",
)
def gateway_command(config_path: Path) -> None:
    """Run a gateway agent: fetch artifacts over MQTT and flash its nodes."""
    import logging

    from gateway_proxy.agent import GatewayAgent
    from gateway_proxy.config import load_config
    from gateway_proxy.service import run_gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(config_path)
    agent = GatewayAgent(config, _load_trust(config.trust))
    try:
        _run_async(lambda stop: run_gateway(agent, stop))
    finally:
        agent.close()  # workers waiting on blocks or on a "retry later" stop; jobs stay on disk


@main.group(cls=ShoalGroup)
def devices() -> None:
    """Gateways and the nodes behind them (pending -> accepted -> decommissioned)."""


def _device_command(name: str, op: str, with_id: bool, help_text: str) -> None:
    def run(
        host: str,
        port: int,
        operator: str,
        password: str | None,
        password_file: Path | None,
        as_json: bool,
        **kw: Any,
    ) -> None:
        client = Client(host, port, operator, password, password_file)
        show(client.call(op, {"id": kw["device_id"]} if with_id else {}), as_json)

    run.__doc__ = help_text
    command = operator_options(run)
    if with_id:
        command = click.argument("device_id")(command)
    devices.command(name, help=help_text)(command)


_device_command("list", "devices.list", False, "List gateways and their nodes.")
_device_command("show", "devices.show", True, "Show one gateway, its nodes and what they run.")
_device_command("add", "devices.add", True, "Register a gateway (pending); prints its secret once.")
_device_command("accept", "devices.accept", True, "Accept a pending gateway: it may get work.")
_device_command(
    "decommission",
    "devices.decommission",
    True,
    "Decommission a gateway: its credentials stop working at once.",
)


@artifact.command("upload")
@click.argument("file", type=EXISTING_FILE)
@operator_options
def artifact_upload(
    file: Path,
    host: str,
    port: int,
    operator: str,
    password: str | None,
    password_file: Path | None,
    as_json: bool,
) -> None:
    """Upload a signed artifact to the orchestrator's store (it verifies it first)."""
    client = Client(host, port, operator, password, password_file)
    show(client.call("artifact.upload", {"data": _read_artifact(file)}), as_json)


class DeployGroup(DefaultGroup, ShoalGroup):  # type: ignore[misc]
    """``shoal deploy ARTIFACT --nodes ...`` runs ``create``; ``shoal deploy status ID`` too."""


@main.group(cls=DeployGroup, default="create", default_if_no_args=False)
def deploy() -> None:
    """Deploy an artifact to nodes (``deploy ARTIFACT --nodes``), and follow deployments."""


@deploy.command("create")
@click.argument("artifact_ref")
@click.option("--nodes", required=True, help="Comma-separated GATEWAY/NODE list.")
@operator_options
def deploy_create(
    artifact_ref: str,
    nodes: str,
    host: str,
    port: int,
    operator: str,
    password: str | None,
    password_file: Path | None,
    as_json: bool,
) -> None:
    """Deploy ARTIFACT_REF (the full artifact's digest) to the given nodes."""
    client = Client(host, port, operator, password, password_file)
    targets = [n.strip() for n in nodes.split(",") if n.strip()]
    show(client.call("deploy.create", {"artifact": artifact_ref, "nodes": targets}), as_json)


@deploy.command("status")
@click.argument("deployment_id")
@operator_options
def deploy_status(
    deployment_id: str,
    host: str,
    port: int,
    operator: str,
    password: str | None,
    password_file: Path | None,
    as_json: bool,
) -> None:
    """Show a deployment: each node's state and bytes."""
    client = Client(host, port, operator, password, password_file)
    show(client.call("deploy.status", {"id": deployment_id}), as_json)


@main.group(cls=ShoalGroup)
def broker() -> None:
    """The MQTT broker: configuration for a production mosquitto."""


@broker.command("mosquitto-config")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The orchestrator's data folder (its registry holds the accounts).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", default=1883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="0.0.0.0", show_default=True)  # noqa: S104 - a broker serves the fleet
@click.option(
    "--persistence",
    "persistence_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for mosquitto's persistence (default: OUT/persistence). Without it, messages "
    "queued for a reconnecting orchestrator are lost when mosquitto restarts.",
)
@click.option("--no-persistence", is_flag=True, help="Run mosquitto without persistence.")
@click.option(
    "--user",
    "run_as_user",
    default=None,
    help="The user mosquitto drops to when started as root (default: mosquitto).",
)
@click.option("--tls-cert", type=EXISTING_FILE, default=None, help="TLS certificate (PEM).")
@click.option("--tls-key", type=EXISTING_FILE, default=None, help="TLS private key (PEM).")
def broker_mosquitto_config(
    data_dir: Path,
    out_dir: Path,
    port: int,
    host: str,
    persistence_dir: Path | None,
    no_persistence: bool,
    run_as_user: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Write mosquitto.conf, passwd and acl from the registry.

    Run it again after adding, accepting or decommissioning gateways and send
    mosquitto SIGHUP: it re-reads the password and ACL files.
    """
    from broker.mosquitto import Account, TlsFiles, write_mosquitto_config
    from orchestrator.core import Orchestrator

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    accounts = [Account(u, h, r) for u, h, r in Orchestrator.read_accounts(data_dir)]
    out_dir.mkdir(parents=True, exist_ok=True)
    persistence = None if no_persistence else (persistence_dir or out_dir / "persistence")
    conf = write_mosquitto_config(
        out_dir, accounts=accounts, port=port, host=host,
        tls=TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None,
        persistence_dir=persistence, run_as_user=run_as_user,
    )  # fmt: skip
    click.echo(f"{conf} ({len(accounts)} accounts)")


# --- demo ---------------------------------------------------------------------


@main.command("demo")
@click.option("--gateways", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option(
    "--nodes",
    default=3,
    show_default=True,
    type=click.IntRange(1, 8),
    help="Simulated nodes per gateway.",
)
@click.option(
    "--baud",
    default=115200,
    show_default=True,
    type=click.IntRange(9600, 4_000_000),
    help="Line rate of every node's (paced) serial link.",
)
@click.option(
    "--image-size",
    type=click.IntRange(4096, 4 * 1024 * 1024),
    default=None,
    help="Use code-like images of this many bytes instead of the example firmware.",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep everything in this folder (default: a temporary one, removed).",
)
@click.option(
    "--flash-timing/--no-flash-timing",
    default=True,
    show_default=True,
    help="Model nRF52840 flash erase and write times on the nodes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON only.")
def demo_command(
    gateways: int,
    nodes: int,
    baud: int,
    image_size: int | None,
    data: Path | None,
    flash_timing: bool,
    as_json: bool,
) -> None:
    """Run the whole system once: orchestrator, broker, gateways, nodes, a two-phase rollout."""
    import asyncio
    import logging

    from shoal.demo import DemoOptions, run_demo, summary_json
    from shoal.demo_view import DemoView

    logging.basicConfig(level=logging.CRITICAL)
    options = DemoOptions(
        gateways=gateways,
        nodes=nodes,
        baud=baud,
        image_size=image_size,
        data=data,
        flash_timing=flash_timing,
    )
    view = DemoView(enabled=not as_json)
    with view:
        report = asyncio.run(run_demo(options, view.update))
    if as_json:
        click.echo(summary_json(report))
    else:
        view.summary(report)
    sys.exit(0 if report.ok else 1)


# --- bench ------------------------------------------------------------------


@main.group(cls=ShoalGroup)
def bench() -> None:
    """Benchmarks that print their figures and the ratio to their target or limit."""


@bench.command("delta")
@click.option(
    "--corpus",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of firmware pairs NAME-v1.bin/NAME-v2.bin (default: build the examples).",
)
@click.option(
    "--synthetic-mib",
    default=1.0,
    show_default=True,
    type=float,
    help="Size of the synthetic image pairs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench_delta(corpus: Path | None, synthetic_mib: float, as_json: bool) -> None:
    """Delta sizes and times over real Cortex-M firmware and synthetic pairs."""
    from shoal.bench_delta import run

    run(corpus=corpus, synthetic_bytes=int(synthetic_mib * 1024 * 1024), as_json=as_json)


@bench.command("serial")
@click.option("--image-kib", default=256, show_default=True, type=click.IntRange(4, 8192))
@click.option("--only", default=None, help="Run only the runs whose name contains this.")
@click.option(
    "--driver",
    "drivers",
    multiple=True,
    type=click.Choice(["all", "smpclient", "shoal-smp", "shoal-smp-window2", "shoal-serial"]),
    help="Compare node drivers at 115200 instead: smpclient and Shoal's SMP driver (also "
    "with window 2) into the SMP-mode node, Shoal's protocol into the simulated node "
    "(repeatable; 'all').",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench_serial(image_kib: int, only: str | None, drivers: tuple[str, ...], as_json: bool) -> None:
    """Serial goodput through a paced line, against the line or flash limit."""
    if drivers:
        from shoal import bench_drivers

        chosen = bench_drivers.DRIVERS if "all" in drivers else drivers
        try:
            bench_drivers.run(image_kib=image_kib, drivers=tuple(chosen), as_json=as_json)
        except UsageError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    from shoal.bench_serial import run

    run(image_kib=image_kib, only=only, as_json=as_json)


@bench.command("fanout")
@click.option("--gateways", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--nodes-per-gateway", default=10, show_default=True, type=click.IntRange(1, 256))
@click.option(
    "--api",
    type=click.Choice(["rollout", "deploy"]),
    default=None,
    help="rollout.create or deploy.create (default: the rollout).",
)
@click.option(
    "--overlap",
    is_flag=True,
    help="Nodes report right after their ACK, not once every node is offered.",
)
@click.option(
    "--timeout", "timeout_s", default=300.0, show_default=True, type=click.FloatRange(10, 3600)
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench_fanout(
    gateways: int,
    nodes_per_gateway: int,
    api: str | None,
    overlap: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """A rollout to simulated gateways on mosquitto: dispatch and ingest rates vs the broker."""
    from shoal.bench_fanout import run

    run(
        gateways=gateways,
        nodes_per_gateway=nodes_per_gateway,
        as_json=as_json,
        api=api,
        overlap=overlap,
        timeout_s=timeout_s,
    )


def _register_rollouts() -> None:
    """Rollouts, groups and the audit log live in :mod:`shoal.cli_rollouts`."""
    from shoal.cli_rollouts import audit, groups, rollout

    for command in (rollout, groups, audit):
        main.add_command(command)


_register_rollouts()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
