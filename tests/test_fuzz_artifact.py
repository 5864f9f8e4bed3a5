"""Arbitrary and mutated bytes only ever raise Shoal's own InvalidInput."""

from __future__ import annotations

import contextlib
import hashlib

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from otaproto.artifact import build_full_artifact, inspect_artifact, verify_artifact
from otaproto.cose import decode_signed_manifest
from otaproto.errors import InvalidInput
from otaproto.keys import SigningKey, TrustedKeys
from otaproto.manifest import Manifest, PayloadKind, decode_manifest
from tests.conftest import GOLDEN_SEED

KEY = SigningKey.from_ed25519_seed(GOLDEN_SEED)
TRUST = TrustedKeys([KEY.public_key])
VALID = build_full_artifact(
    b"\x42" * 300, name="fuzz", version="1", sequence=1, device_types=("t",), key=KEY, created_s=0
)


def only_our_errors(data: bytes) -> None:
    for parse in (
        lambda d: verify_artifact(d, TRUST),
        inspect_artifact,
        decode_manifest,
        decode_signed_manifest,
    ):
        with contextlib.suppress(InvalidInput):
            parse(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
@example(b"\xd9\xd9\xf7")
@example(b"\xd9\xd9\xf7\x83\x01\xd2\x84")
@example(b"\xd9\xd9\xf7\x9b\xff\xff\xff\xff\xff\xff\xff\xff")
@example(b"\x81" * 5000)
def test_arbitrary_bytes(data: bytes) -> None:
    only_our_errors(data)


@settings(max_examples=500)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_mutated_artifacts(edits: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for at, value in edits:
        data[at] = value
    only_our_errors(bytes(data))


@settings(max_examples=200)
@given(st.integers(1, len(VALID) - 1))
def test_every_truncation(cut: int) -> None:
    only_our_errors(VALID[:cut])


text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=40)


@settings(max_examples=200)
@given(
    name=text,
    version=text,
    sequence=st.integers(0, 2**64 - 1),
    types=st.lists(text, min_size=1, max_size=4, unique=True),
    image=st.binary(min_size=1, max_size=300),
    created=st.integers(0, 2**40),
    metadata=st.dictionaries(text, text, max_size=3),
)
def test_manifest_round_trip(
    name: str,
    version: str,
    sequence: int,
    types: list[str],
    image: bytes,
    created: int,
    metadata: dict[str, str],
) -> None:
    digest = hashlib.sha256(image).digest()
    manifest = Manifest(
        name,
        version,
        sequence,
        tuple(types),
        len(image),
        digest,
        PayloadKind.FULL,
        len(image),
        digest,
        created,
        metadata=metadata,
    )
    assert decode_manifest(manifest.to_cbor()) == manifest
