"""Artifacts: round trips, golden bytes, and every kind of bad input."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest

from otaproto import cbor, cose
from otaproto.artifact import (
    VerifiedArtifact,
    build_artifact,
    build_delta_artifact,
    build_full_artifact,
    inspect_artifact,
    verify_artifact,
)
from otaproto.errors import (
    BaseMismatch,
    DeviceTypeMismatch,
    DigestMismatch,
    InvalidInput,
    LimitExceeded,
    MalformedError,
    RollbackRefused,
    SignatureError,
    UnknownKeyError,
    UsageError,
)
from otaproto.keys import PublicKey, SigningKey, TrustedKeys
from otaproto.manifest import PayloadKind, decode_manifest
from tests.conftest import evolve, firmware_like

VECTORS = Path(__file__).parent / "vectors"


def full(key: SigningKey, image: bytes, *, version: str = "1.0.0", sequence: int = 1) -> bytes:
    return build_full_artifact(
        image,
        name="blinky",
        version=version,
        sequence=sequence,
        device_types=("nrf52840",),
        key=key,
        created_s=1_700_000_000,
    )


def trust(*keys: SigningKey) -> TrustedKeys:
    return TrustedKeys([k.public_key for k in keys])


# --- round trips ------------------------------------------------------------


def test_full_artifact_verifies_and_gives_back_the_image(ed_key: SigningKey) -> None:
    image = firmware_like(10_000, seed=1)
    verified = verify_artifact(
        full(ed_key, image), trust(ed_key), device_type="nrf52840", installed_sequence=0
    )
    assert verified.rebuild_image() == image
    assert verified.manifest.image_digest == hashlib.sha256(image).digest()
    assert verified.manifest.payload_kind is PayloadKind.FULL


def test_p256_artifact_verifies_among_several_trusted_keys(
    ed_key: SigningKey, p256_key: SigningKey, other_key: SigningKey
) -> None:
    data = full(p256_key, b"\x01" * 100)
    assert verify_artifact(data, trust(other_key, p256_key, ed_key)).manifest.version == "1.0.0"


def test_delta_rebuilds_the_target_image(ed_key: SigningKey) -> None:
    v1 = firmware_like(64 * 1024, seed=2)
    v2 = evolve(v1, seed=3)
    base = verify_artifact(full(ed_key, v1), trust(ed_key))
    target = verify_artifact(full(ed_key, v2, version="1.1.0", sequence=2), trust(ed_key))
    outcome = build_delta_artifact(base, target, ed_key, created_s=1)
    assert outcome.used_delta
    assert len(outcome.artifact) < len(v2) * 0.6
    delta = verify_artifact(outcome.artifact, trust(ed_key))
    assert delta.manifest.base_digest == hashlib.sha256(v1).digest()
    assert delta.manifest.image_digest == hashlib.sha256(v2).digest()
    assert delta.rebuild_image(v1) == v2


def test_delta_that_is_not_worth_it_becomes_a_full_artifact(ed_key: SigningKey) -> None:
    v1 = firmware_like(8_000, seed=4)
    v2 = bytes(hashlib.sha256(bytes([i % 256, i // 256])).digest()[0] for i in range(8_000))
    base = verify_artifact(full(ed_key, v1), trust(ed_key))
    target = verify_artifact(full(ed_key, v2, version="2", sequence=2), trust(ed_key))
    outcome = build_delta_artifact(base, target, ed_key, created_s=1)
    assert not outcome.used_delta
    assert outcome.ratio > 0.6
    again = verify_artifact(outcome.artifact, trust(ed_key))
    assert again.manifest.payload_kind is PayloadKind.FULL
    assert again.rebuild_image() == v2


def test_verified_artifact_cannot_be_made_by_hand(ed_key: SigningKey) -> None:
    verified = verify_artifact(full(ed_key, b"abc"), trust(ed_key))
    with pytest.raises(UsageError):
        VerifiedArtifact(verified.manifest, b"evil", verified.signed_manifest, verified.key_id)


def test_inspect_reads_without_a_key(ed_key: SigningKey) -> None:
    info = inspect_artifact(full(ed_key, b"abc"))
    assert info.manifest.name == "blinky"
    assert info.key_id == ed_key.public_key.key_id


def test_signed_manifest_is_what_a_node_verifies(ed_key: SigningKey) -> None:
    verified = verify_artifact(full(ed_key, b"abc" * 10), trust(ed_key))
    parts = cose.decode_signed_manifest(verified.signed_manifest)
    assert cose.verify_signed(parts, trust(ed_key)) == verified.manifest


def test_key_pem_round_trip(ed_key: SigningKey, p256_key: SigningKey) -> None:
    for key in (ed_key, p256_key):
        assert SigningKey.from_pem(key.to_pem()).public_key.raw == key.public_key.raw
        assert PublicKey.from_pem(key.public_key.to_pem()).key_id == key.public_key.key_id


# --- golden vectors -----------------------------------------------------------


def golden_artifact(key: SigningKey) -> bytes:
    image = bytes(range(256)) * 4
    return build_full_artifact(
        image,
        name="golden",
        version="1.2.3",
        sequence=7,
        device_types=("nrf52840", "nrf5340"),
        key=key,
        created_s=1_767_225_600,
        metadata={"git": "0123abc"},
    )


def test_golden_vector_bytes_are_stable(ed_key: SigningKey) -> None:
    """Exact bytes: Ed25519 signatures are deterministic, the encoding is too."""
    data = golden_artifact(ed_key)
    expected = (VECTORS / "full-ed25519.art").read_bytes()
    assert data == expected
    assert data[:3] == b"\xd9\xd9\xf7"
    assert ed_key.public_key.to_pem() == (VECTORS / "golden.pub").read_bytes()
    assert verify_artifact(expected, trust(ed_key)).manifest.sequence == 7


def test_golden_manifest_layout(ed_key: SigningKey) -> None:
    parts = cose.decode_signed_manifest(
        verify_artifact(golden_artifact(ed_key), trust(ed_key)).signed_manifest
    )
    assert parts.protected == bytes.fromhex("a201270448") + ed_key.public_key.key_id
    raw = cbor2.loads(parts.manifest_bytes)
    assert list(raw) == [*range(1, 11), 13, 14]
    assert raw[5] == ["nrf52840", "nrf5340"]


# --- bad input: each names what failed ---------------------------------------


def test_truncated_file(ed_key: SigningKey) -> None:
    data = full(ed_key, b"x" * 1000)
    for cut in (1, 3, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedError, match="artifact"):
            verify_artifact(data[:cut], trust(ed_key))


def test_random_bytes(ed_key: SigningKey) -> None:
    with pytest.raises(MalformedError, match="not a Shoal artifact"):
        verify_artifact(bytes(range(200)), trust(ed_key))


def test_wrong_cbor_tag(ed_key: SigningKey) -> None:
    data = full(ed_key, b"abc")
    body = list(cbor2.loads(data))
    body[1] = cbor2.CBORTag(98, body[1].value)
    forged = b"\xd9\xd9\xf7" + cbor.encode(body)
    with pytest.raises(MalformedError, match=r"expected COSE_Sign1 \(CBOR tag 18\), found tag 98"):
        verify_artifact(forged, trust(ed_key))


def test_manifest_larger_than_the_limit(ed_key: SigningKey) -> None:
    image = b"abc"
    manifest = decode_manifest(
        cose.decode_signed_manifest(
            verify_artifact(full(ed_key, image), trust(ed_key)).signed_manifest
        ).manifest_bytes
    )
    fat = replace(manifest, metadata={f"k{i}": "v" * 120 for i in range(16)})
    with pytest.raises(UsageError, match=r"manifest is .* over the limit"):
        build_artifact(fat, image, ed_key)
    # A forged container holding an oversized manifest is refused before decoding it.
    body = list(cbor2.loads(full(ed_key, image)))
    signed = list(body[1].value)
    signed[2] = b"\xa0" + b"\x00" * 5000
    body[1] = cbor2.CBORTag(18, signed)
    with pytest.raises(LimitExceeded, match="manifest is 5001 bytes, over the limit of 2048"):
        verify_artifact(b"\xd9\xd9\xf7" + cbor.encode(body), trust(ed_key))


def test_oversized_artifact_is_refused_before_parsing(ed_key: SigningKey) -> None:
    from otaproto.limits import Limits

    with pytest.raises(LimitExceeded, match="artifact is 2000 bytes"):
        verify_artifact(b"\x00" * 2000, trust(ed_key), limits=Limits(max_artifact_bytes=1000))


def test_wrong_key(ed_key: SigningKey, other_key: SigningKey) -> None:
    with pytest.raises(UnknownKeyError, match="unknown key id " + ed_key.public_key.key_id.hex()):
        verify_artifact(full(ed_key, b"abc"), trust(other_key))


def test_same_key_id_but_bad_signature(ed_key: SigningKey) -> None:
    data = bytearray(full(ed_key, b"abc"))
    sig_at = data.find(b"\x58\x40") + 2  # the 64-byte signature's head
    data[sig_at] ^= 0x01
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_artifact(bytes(data), trust(ed_key))


def test_one_flipped_bit_in_the_payload(ed_key: SigningKey) -> None:
    data = bytearray(full(ed_key, b"\x00" * 4096))
    data[-100] ^= 0x10
    with pytest.raises(DigestMismatch, match="payload digest"):
        verify_artifact(bytes(data), trust(ed_key))


def test_one_flipped_bit_in_the_manifest(ed_key: SigningKey) -> None:
    data = full(ed_key, b"\x00" * 64)
    at = data.find(b"blinky")
    for bit in range(8):
        flipped = bytearray(data)
        flipped[at] ^= 1 << bit
        with pytest.raises(InvalidInput) as info:
            verify_artifact(bytes(flipped), trust(ed_key))
        assert isinstance(info.value, SignatureError | MalformedError)


def test_every_single_bit_flip_of_a_small_artifact_is_caught(ed_key: SigningKey) -> None:
    data = full(ed_key, b"\x5a" * 32)
    for at in range(len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x04
        with pytest.raises(InvalidInput):
            verify_artifact(bytes(flipped), trust(ed_key))


def test_delta_against_the_wrong_base(ed_key: SigningKey) -> None:
    v1 = firmware_like(16_384, seed=5)
    v2 = evolve(v1, seed=6)
    base = verify_artifact(full(ed_key, v1), trust(ed_key))
    target = verify_artifact(full(ed_key, v2, version="2", sequence=2), trust(ed_key))
    delta = verify_artifact(
        build_delta_artifact(base, target, ed_key, created_s=1).artifact, trust(ed_key)
    )
    with pytest.raises(BaseMismatch, match=r"base image is not version 1\.0\.0"):
        delta.rebuild_image(v2)
    with pytest.raises(BaseMismatch, match="needs the base image"):
        delta.rebuild_image(None)


def test_device_type_and_sequence_are_checked_after_the_signature(ed_key: SigningKey) -> None:
    data = full(ed_key, b"abc", sequence=5)
    with pytest.raises(DeviceTypeMismatch, match="for nrf52840, not esp32"):
        verify_artifact(data, trust(ed_key), device_type="esp32")
    with pytest.raises(RollbackRefused, match="sequence 5 is not newer than installed 5"):
        verify_artifact(data, trust(ed_key), installed_sequence=5)
    assert verify_artifact(data, trust(ed_key), installed_sequence=4).manifest.sequence == 5


def test_unknown_manifest_key_is_rejected_even_when_signed(ed_key: SigningKey) -> None:
    raw = cbor2.loads(
        cose.decode_signed_manifest(
            verify_artifact(full(ed_key, b"abc"), trust(ed_key)).signed_manifest
        ).manifest_bytes
    )
    raw[99] = "surprise"
    with pytest.raises(MalformedError, match="unknown key 99"):
        decode_manifest(cbor.encode(raw))


def test_non_deterministic_manifest_encoding_is_rejected(ed_key: SigningKey) -> None:
    manifest_bytes = cose.decode_signed_manifest(
        verify_artifact(full(ed_key, b"abc"), trust(ed_key)).signed_manifest
    ).manifest_bytes
    # Re-encode the sequence number 1 in a longer form than needed: 0x18 0x01.
    at = manifest_bytes.find(b"\x04\x01")
    longer = manifest_bytes[:at] + b"\x04\x18\x01" + manifest_bytes[at + 2 :]
    with pytest.raises(MalformedError, match="not in deterministic CBOR"):
        decode_manifest(longer)


def test_payload_swapped_from_another_artifact(ed_key: SigningKey) -> None:
    a = list(cbor2.loads(full(ed_key, b"A" * 100)))
    b = cbor2.loads(full(ed_key, b"B" * 100))
    a[2] = b[2]
    with pytest.raises(DigestMismatch):
        verify_artifact(b"\xd9\xd9\xf7" + cbor.encode(a), trust(ed_key))
