"""``shoal bench delta``: delta artifact sizes and times over a firmware corpus.

Each pair is measured in fresh child processes (one to make the delta, one to
verify and apply it). The memory figure is how far the step raised the
child's resident set above where it stood just before (Linux: the peak is
reset through ``/proc/self/clear_refs`` and read back as ``VmHWM``): the extra
memory a gateway or a CI runner needs for the step, inputs already loaded. Targets from the artifact
issue: the delta artifact is at most 1 KiB larger than the raw bsdiff4 patch;
making a delta of a 1 MiB image takes at most 2 s; verifying and applying it
at most 0.5 s.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from otaproto.artifact import build_delta_artifact, build_full_artifact, verify_artifact
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import evolve, firmware_like

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "examples" / "firmware"
OVERHEAD_TARGET_BYTES = 1024
MAKE_TARGET_S_PER_MIB = 2.0
APPLY_TARGET_S_PER_MIB = 0.5
SEED = bytes(range(32))


@dataclass(frozen=True)
class PairResult:
    """One row of the benchmark."""

    pair: str
    image_bytes: int
    delta_artifact_bytes: int
    ratio: float
    raw_patch_bytes: int
    overhead_bytes: int
    make_s: float
    verify_apply_s: float
    make_peak_mib: float
    apply_peak_mib: float
    used_delta: bool


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> float:
    """Reset the peak resident set and return the current one, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _peak_since(before_mib: float) -> float:
    return max(0.0, _status_mib("VmHWM") - before_mib)


def _artifacts(v1: bytes, v2: bytes) -> tuple[bytes, bytes]:
    key = SigningKey.from_ed25519_seed(SEED)
    common = {"name": "bench", "device_types": ("bench",), "key": key, "created_s": 0}
    a1 = build_full_artifact(v1, version="1", sequence=1, **common)  # type: ignore[arg-type]
    a2 = build_full_artifact(v2, version="2", sequence=2, **common)  # type: ignore[arg-type]
    return a1, a2


def _make(v1: bytes, v2: bytes) -> tuple[bytes, int, bool, float, float]:
    key = SigningKey.from_ed25519_seed(SEED)
    trusted = TrustedKeys([key.public_key])
    a1, a2 = _artifacts(v1, v2)
    base, target = verify_artifact(a1, trusted), verify_artifact(a2, trusted)
    before = _reset_peak()
    started = time.perf_counter()
    outcome = build_delta_artifact(base, target, key, created_s=0)
    elapsed = time.perf_counter() - started
    peak = _peak_since(before)
    return outcome.artifact, outcome.patch_size, outcome.used_delta, elapsed, peak


def _apply(artifact: bytes, v1: bytes, v2: bytes) -> tuple[float, float]:
    trusted = TrustedKeys([SigningKey.from_ed25519_seed(SEED).public_key])
    before = _reset_peak()
    started = time.perf_counter()
    image = verify_artifact(artifact, trusted).rebuild_image(v1)
    elapsed = time.perf_counter() - started
    peak = _peak_since(before)
    if image != v2:
        raise RuntimeError("rebuilt image differs from the target")
    return elapsed, peak


def measure(name: str, v1: bytes, v2: bytes) -> PairResult:
    """Make, then verify and apply, the delta of one pair, each in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        artifact, patch_bytes, used_delta, make_s, make_mib = pool.apply(_make, (v1, v2))
    with context.Pool(1, maxtasksperchild=1) as pool:
        apply_s, apply_mib = pool.apply(_apply, (artifact, v1, v2))
    return PairResult(
        pair=name,
        image_bytes=len(v2),
        delta_artifact_bytes=len(artifact),
        ratio=len(artifact) / len(v2),
        raw_patch_bytes=patch_bytes,
        overhead_bytes=len(artifact) - patch_bytes,
        make_s=make_s,
        verify_apply_s=apply_s,
        make_peak_mib=make_mib,
        apply_peak_mib=apply_mib,
        used_delta=used_delta,
    )


def real_pairs(corpus: Path | None) -> tuple[list[tuple[str, bytes, bytes]], str | None]:
    """Firmware pairs from ``corpus``, or built from ``examples/firmware``; a note if none."""
    if corpus is not None:
        pairs = []
        for v1 in sorted(corpus.glob("*-v1.bin")):
            v2 = v1.with_name(v1.name.replace("-v1.bin", "-v2.bin"))
            if v2.exists():
                pairs.append((v1.name[: -len("-v1.bin")], v1.read_bytes(), v2.read_bytes()))
        return pairs, None if pairs else f"no NAME-v1.bin/NAME-v2.bin pairs in {corpus}"
    if shutil.which("arm-none-eabi-gcc") is None:
        return [], "arm-none-eabi-gcc is missing: real Cortex-M pairs skipped"
    out = Path(tempfile.mkdtemp(prefix="shoal-fw-"))
    try:
        built = subprocess.run(
            ["bash", str(FIRMWARE_DIR / "build.sh"), str(out)], capture_output=True, text=True
        )
        if built.returncode != 0:
            lines = (built.stderr or built.stdout or "no output").strip().splitlines()
            return [], f"examples/firmware/build.sh failed: {lines[-1] if lines else ''}"
        return [
            (
                "cortex-m4 app (gcc)",
                (out / "fw-v1.bin").read_bytes(),
                (out / "fw-v2.bin").read_bytes(),
            )
        ], None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def synthetic_pairs(size_bytes: int) -> list[tuple[str, bytes, bytes]]:
    """Code-like pairs at ``size_bytes`` and a quarter of it, plus two hard cases."""
    big = firmware_like(size_bytes, seed=1)
    small = firmware_like(size_bytes // 4, seed=2)
    noise = random.Random(3).randbytes(size_bytes)
    noisy = bytearray(noise)
    rng = random.Random(4)
    for _ in range(size_bytes // 100):
        noisy[rng.randrange(size_bytes)] = rng.randrange(256)
    mib = size_bytes / (1024 * 1024)
    return [
        (f"synthetic {mib:g} MiB, 1% changed + 2 KiB inserted", big, evolve(big, seed=5)),
        (f"synthetic {mib / 4:g} MiB, 1% changed + 2 KiB inserted", small, evolve(small, seed=6)),
        (f"random {mib:g} MiB, 1% of bytes changed", noise, bytes(noisy)),
        (f"unrelated random {mib / 4:g} MiB (full fallback)", small, noise[: len(small)]),
    ]


def run(*, corpus: Path | None, synthetic_bytes: int, as_json: bool) -> list[PairResult]:
    """Measure every pair and print a table (or JSON) with the ratio to each target."""
    pairs, note = real_pairs(corpus)
    pairs += synthetic_pairs(synthetic_bytes)
    results = [measure(name, v1, v2) for name, v1, v2 in pairs]
    rows = []
    for r in results:
        mib = r.image_bytes / (1024 * 1024)
        rows.append(
            {
                **asdict(r),
                "overhead_vs_target": r.overhead_bytes / OVERHEAD_TARGET_BYTES,
                "make_vs_target": r.make_s / (MAKE_TARGET_S_PER_MIB * max(mib, 1 / 64)),
                "apply_vs_target": r.verify_apply_s / (APPLY_TARGET_S_PER_MIB * max(mib, 1 / 64)),
            }
        )
    if as_json:
        print(json.dumps({"pairs": rows, "note": note}, indent=2))
        return results
    if note:
        print(f"note: {note}")
    header = (
        f"{'pair':48} {'image':>9} {'delta art':>9} {'ratio':>6} {'patch':>9} {'ovh B':>5}"
        f" {'make s':>7} {'apply s':>7} {'mk MiB':>6} {'ap MiB':>6}"
    )
    print(header)
    for r in results:
        print(
            f"{r.pair[:48]:48} {r.image_bytes:>9} {r.delta_artifact_bytes:>9} {r.ratio:>6.1%}"
            f" {r.raw_patch_bytes:>9} {r.overhead_bytes:>5} {r.make_s:>7.3f}"
            f" {r.verify_apply_s:>7.3f} {r.make_peak_mib:>6.1f} {r.apply_peak_mib:>6.1f}"
            + ("" if r.used_delta else "  (full: delta not worth it)")
        )
    print(
        "targets: overhead <= 1024 B over the raw patch; per MiB of image: make <= 2 s, "
        "verify+apply <= 0.5 s (ratios in --json)"
    )
    return results
