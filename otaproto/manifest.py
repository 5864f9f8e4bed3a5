"""The manifest: the signed description of one firmware image.

Rules (spec: ``docs/artifact-format.md`` §Manifest):

* A manifest is a CBOR map with small integer keys, so that a node written in
  C can walk it without a string table. Every key below is required except
  ``base_digest``/``base_version`` (present exactly for a delta) and
  ``metadata`` (optional). Any other key is rejected: a verifier must not
  accept a field it does not understand.
* The encoding is deterministic (RFC 8949 §4.2.1) and checked on decode.
* For ``full`` payloads the payload *is* the image: sizes and digests match.
* The image digest and size always describe the *full* image, also for a
  delta, so a node verifies the same signed manifest whatever the gateway
  fetched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from otaproto import cbor
from otaproto.errors import LimitExceeded, MalformedError, UsageError
from otaproto.limits import DEFAULT_LIMITS, Limits

FORMAT_VERSION = 1
DIGEST_BYTES = 32
MAX_UINT64 = 2**64 - 1


class Key(IntEnum):
    """Manifest map keys."""

    FORMAT = 1
    NAME = 2
    VERSION = 3
    SEQUENCE = 4
    DEVICE_TYPES = 5
    IMAGE_SIZE = 6
    IMAGE_DIGEST = 7
    PAYLOAD_KIND = 8
    PAYLOAD_SIZE = 9
    PAYLOAD_DIGEST = 10
    BASE_DIGEST = 11
    BASE_VERSION = 12
    CREATED = 13
    METADATA = 14


class PayloadKind(StrEnum):
    """What the artifact's payload is: the image itself or a bsdiff4 patch to it."""

    FULL = "full"
    BSDIFF4 = "bsdiff4"


_REQUIRED = frozenset(
    {
        Key.FORMAT,
        Key.NAME,
        Key.VERSION,
        Key.SEQUENCE,
        Key.DEVICE_TYPES,
        Key.IMAGE_SIZE,
        Key.IMAGE_DIGEST,
        Key.PAYLOAD_KIND,
        Key.PAYLOAD_SIZE,
        Key.PAYLOAD_DIGEST,
        Key.CREATED,
    }
)
_KNOWN = frozenset(int(k) for k in Key)


@dataclass(frozen=True)
class Manifest:
    """A decoded, structurally valid manifest (not by itself proof of anything)."""

    name: str
    version: str
    sequence: int
    device_types: tuple[str, ...]
    image_size: int
    image_digest: bytes
    payload_kind: PayloadKind
    payload_size: int
    payload_digest: bytes
    created_s: int
    base_digest: bytes | None = None
    base_version: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_delta(self) -> bool:
        """True when the payload is a patch against ``base_digest``."""
        return self.payload_kind is PayloadKind.BSDIFF4

    def to_cbor(self) -> bytes:
        """Deterministic CBOR. Raises UsageError for a manifest that could not be decoded back."""
        body: dict[int, Any] = {
            Key.FORMAT: FORMAT_VERSION,
            Key.NAME: self.name,
            Key.VERSION: self.version,
            Key.SEQUENCE: self.sequence,
            Key.DEVICE_TYPES: list(self.device_types),
            Key.IMAGE_SIZE: self.image_size,
            Key.IMAGE_DIGEST: self.image_digest,
            Key.PAYLOAD_KIND: str(self.payload_kind),
            Key.PAYLOAD_SIZE: self.payload_size,
            Key.PAYLOAD_DIGEST: self.payload_digest,
            Key.CREATED: self.created_s,
        }
        if self.base_digest is not None:
            body[Key.BASE_DIGEST] = self.base_digest
        if self.base_version is not None:
            body[Key.BASE_VERSION] = self.base_version
        if self.metadata:
            body[Key.METADATA] = dict(self.metadata)
        encoded = cbor.encode({int(k): v for k, v in body.items()})
        try:
            decode_manifest(encoded)
        except (MalformedError, LimitExceeded) as exc:
            raise UsageError(f"refusing to encode an invalid manifest: {exc}") from exc
        return encoded


def full_manifest(
    image: bytes,
    *,
    name: str,
    version: str,
    sequence: int,
    device_types: tuple[str, ...],
    created_s: int,
    metadata: Mapping[str, str] | None = None,
) -> Manifest:
    """The manifest of a full-image artifact for ``image``."""
    digest = hashlib.sha256(image).digest()
    return Manifest(
        name=name,
        version=version,
        sequence=sequence,
        device_types=device_types,
        image_size=len(image),
        image_digest=digest,
        payload_kind=PayloadKind.FULL,
        payload_size=len(image),
        payload_digest=digest,
        created_s=created_s,
        metadata=dict(metadata or {}),
    )


def decode_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Decode and check a manifest's structure. Raises MalformedError naming the field."""
    if len(data) > limits.max_signed_manifest_bytes:
        raise LimitExceeded("manifest", len(data), limits.max_signed_manifest_bytes)
    raw = cbor.decode_deterministic(data, "manifest")
    if not isinstance(raw, dict):
        raise MalformedError("manifest", "not a CBOR map")
    for key in raw:
        if not isinstance(key, int) or isinstance(key, bool) or key not in _KNOWN:
            raise MalformedError("manifest", f"unknown key {key!r}")
    missing = sorted(k.name.lower() for k in _REQUIRED if int(k) not in raw)
    if missing:
        raise MalformedError("manifest", f"missing {', '.join(missing)}")

    fmt = _uint(raw, Key.FORMAT)
    if fmt != FORMAT_VERSION:
        raise MalformedError("manifest.format", f"version {fmt} is not supported (want 1)")
    try:
        kind = PayloadKind(_text(raw, Key.PAYLOAD_KIND, limits))
    except ValueError as exc:
        raise MalformedError("manifest.payload_kind", "must be 'full' or 'bsdiff4'") from exc
    device_types = raw[Key.DEVICE_TYPES]
    if not isinstance(device_types, list) or not device_types:
        raise MalformedError("manifest.device_types", "must be a non-empty array")
    if len(device_types) > limits.max_device_types:
        raise MalformedError(
            "manifest.device_types", f"{len(device_types)} entries, over {limits.max_device_types}"
        )
    types = tuple(_check_text(t, "manifest.device_types", limits) for t in device_types)

    manifest = Manifest(
        name=_text(raw, Key.NAME, limits),
        version=_text(raw, Key.VERSION, limits),
        sequence=_uint(raw, Key.SEQUENCE),
        device_types=types,
        image_size=_uint(raw, Key.IMAGE_SIZE),
        image_digest=_digest(raw, Key.IMAGE_DIGEST),
        payload_kind=kind,
        payload_size=_uint(raw, Key.PAYLOAD_SIZE),
        payload_digest=_digest(raw, Key.PAYLOAD_DIGEST),
        created_s=_uint(raw, Key.CREATED),
        base_digest=_digest(raw, Key.BASE_DIGEST) if Key.BASE_DIGEST in raw else None,
        base_version=_text(raw, Key.BASE_VERSION, limits) if Key.BASE_VERSION in raw else None,
        metadata=_metadata(raw.get(Key.METADATA, {}), limits),
    )
    _check_consistency(manifest, limits)
    return manifest


def _check_consistency(m: Manifest, limits: Limits) -> None:
    if m.image_size == 0:
        raise MalformedError("manifest.image_size", "an image cannot be empty")
    if m.image_size > limits.max_image_bytes:
        raise LimitExceeded("manifest.image_size", m.image_size, limits.max_image_bytes)
    if m.payload_size > limits.max_artifact_bytes:
        raise LimitExceeded("manifest.payload_size", m.payload_size, limits.max_artifact_bytes)
    if m.payload_kind is PayloadKind.FULL:
        if m.base_digest is not None or m.base_version is not None:
            raise MalformedError("manifest.base_digest", "present in a full artifact")
        if m.payload_size != m.image_size or m.payload_digest != m.image_digest:
            raise MalformedError("manifest.payload_digest", "a full payload must be the image")
    elif m.base_digest is None or m.base_version is None:
        raise MalformedError(
            "manifest.base_digest", "a delta must name its base digest and version"
        )


def _uint(raw: dict[Any, Any], key: Key) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_UINT64:
        raise MalformedError(f"manifest.{key.name.lower()}", "must be an unsigned 64-bit integer")
    return value


def _digest(raw: dict[Any, Any], key: Key) -> bytes:
    value = raw[key]
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise MalformedError(f"manifest.{key.name.lower()}", "must be a 32-byte SHA-256 digest")
    return value


def _text(raw: dict[Any, Any], key: Key, limits: Limits) -> str:
    return _check_text(raw[key], f"manifest.{key.name.lower()}", limits)


def _check_text(value: object, where: str, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedError(where, "must be a non-empty text string")
    if len(value) > limits.max_text_chars:
        raise MalformedError(where, f"longer than {limits.max_text_chars} characters")
    if not value.isprintable():
        raise MalformedError(where, "holds control characters")
    return value


def _metadata(value: object, limits: Limits) -> dict[str, str]:
    if not isinstance(value, dict):
        raise MalformedError("manifest.metadata", "must be a map of text to text")
    if len(value) > limits.max_metadata_entries:
        raise MalformedError(
            "manifest.metadata", f"{len(value)} entries, over {limits.max_metadata_entries}"
        )
    return {
        _check_text(k, "manifest.metadata", limits): _check_text(v, "manifest.metadata", limits)
        for k, v in value.items()
    }
