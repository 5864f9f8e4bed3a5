"""bsdiff4 patches: applied only within the signed bounds, whatever the patch says."""

from __future__ import annotations

import bz2
import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaproto.artifact import build_artifact, verify_artifact
from otaproto.delta import apply_patch, make_patch
from otaproto.errors import DeltaError, InvalidInput, LimitExceeded
from otaproto.keys import SigningKey, TrustedKeys
from otaproto.manifest import Manifest, PayloadKind
from tests.conftest import evolve, firmware_like


def offtout(value: int) -> bytes:
    raw = abs(value).to_bytes(8, "little")
    return raw[:7] + bytes([raw[7] | (0x80 if value < 0 else 0)])


def crafted(new_size: int, control: list[tuple[int, int, int]], diff: bytes, extra: bytes) -> bytes:
    ctrl = b"".join(offtout(a) + offtout(b) + offtout(c) for a, b, c in control)
    cz, dz, ez = bz2.compress(ctrl), bz2.compress(diff), bz2.compress(extra)
    return b"BSDIFF40" + offtout(len(cz)) + offtout(len(dz)) + offtout(new_size) + cz + dz + ez


def test_round_trip_on_firmware_like_images() -> None:
    v1 = firmware_like(50_000, seed=10)
    v2 = evolve(v1, seed=11)
    assert apply_patch(v1, make_patch(v1, v2), len(v2)) == v2


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.binary(min_size=1, max_size=2000))
def test_round_trip_property(base: bytes, target: bytes) -> None:
    assert apply_patch(base, make_patch(base, target), len(target)) == target


def test_patch_that_writes_past_the_image_size_is_refused() -> None:
    base = b"\x00" * 100
    patch = crafted(100, [(80, 40, 0)], b"\x00" * 80, b"\x01" * 40)
    with pytest.raises(DeltaError, match="writes past the image size"):
        apply_patch(base, patch, 100)


def test_patch_announcing_another_size_than_the_signed_one_is_refused() -> None:
    patch = crafted(2**40, [(10, 0, 0)], b"\x00" * 10, b"")
    with pytest.raises(DeltaError, match="builds 1099511627776 bytes, the signed image size is 10"):
        apply_patch(b"\x00" * 10, patch, 10)


def test_bzip2_bomb_stops_at_the_cap() -> None:
    patch = crafted(1000, [(1000, 0, 0)], b"\x00" * 50_000_000, b"")
    with pytest.raises(
        LimitExceeded, match="patch diff block is 1001 bytes, over the limit of 1000"
    ):
        apply_patch(b"\x00" * 1000, patch, 1000)


def test_patch_reading_past_its_data_blocks_is_refused() -> None:
    patch = crafted(100, [(100, 0, 0)], b"\x00" * 10, b"")
    with pytest.raises(DeltaError, match="reads past its data blocks"):
        apply_patch(b"\x00" * 100, patch, 100)


def test_patch_that_leaves_a_hole_is_refused() -> None:
    patch = crafted(100, [(50, 0, 0)], b"\x00" * 50, b"")
    with pytest.raises(DeltaError, match="fills 50 of 100 image bytes"):
        apply_patch(b"\x00" * 100, patch, 100)


def test_negative_lengths_and_garbage_are_refused() -> None:
    with pytest.raises(DeltaError, match="negative length"):
        apply_patch(b"\x00" * 10, crafted(10, [(-5, 10, 0)], b"", b"\x00" * 10), 10)
    with pytest.raises(DeltaError, match="not a BSDIFF40 patch"):
        apply_patch(b"\x00" * 10, b"BSDIFF39" + b"\x00" * 40, 10)
    good = crafted(10, [(10, 0, 0)], b"\x00" * 10, b"")
    with pytest.raises(DeltaError, match=r"not valid bzip2|truncated"):
        apply_patch(b"\x00" * 10, good[:-5], 10)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_patch_bytes_raise_only_our_errors(noise: bytes) -> None:
    for patch in (noise, b"BSDIFF40" + noise):
        with contextlib.suppress(InvalidInput):
            apply_patch(b"\x00" * 64, patch, 64)


def test_hostile_patch_inside_a_validly_signed_artifact(ed_key: SigningKey) -> None:
    """Even a patch the release key signed cannot make the gateway write out of bounds."""
    base = b"\x00" * 256
    patch = crafted(256, [(200, 100, 0)], b"\x00" * 200, b"\xff" * 100)
    manifest = Manifest(
        name="evil",
        version="2",
        sequence=2,
        device_types=("t",),
        image_size=256,
        image_digest=hashlib.sha256(b"\x01" * 256).digest(),
        payload_kind=PayloadKind.BSDIFF4,
        payload_size=len(patch),
        payload_digest=hashlib.sha256(patch).digest(),
        created_s=0,
        base_digest=hashlib.sha256(base).digest(),
        base_version="1",
    )
    verified = verify_artifact(
        build_artifact(manifest, patch, ed_key), TrustedKeys([ed_key.public_key])
    )
    with pytest.raises(DeltaError, match="writes past the image size"):
        verified.rebuild_image(base)
