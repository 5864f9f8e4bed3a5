"""Artifacts: build them, look inside them, and verify them (the only door).

Rules (spec: ``docs/artifact-format.md``):

* An artifact is ``#6.55799([1, COSE_Sign1, payload: bstr])``: the CBOR
  self-describe tag (the file's magic, ``d9 d9 f7``), a container version, the
  signed manifest, and the payload (the full image or a bsdiff4 patch).
* :func:`verify_artifact` is the only way to obtain a :class:`VerifiedArtifact`,
  and it checks in a fixed order (after python-tuf): size bound, structure,
  signature, payload size and digest, device type, then sequence number
  against what the caller says is installed.
* :meth:`VerifiedArtifact.rebuild_image` checks a delta's base digest before
  patching and the rebuilt image digest after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import cbor2

from otaproto import cbor, cose, delta
from otaproto.errors import (
    BaseMismatch,
    DeviceTypeMismatch,
    DigestMismatch,
    LimitExceeded,
    MalformedError,
    RollbackRefused,
    UsageError,
)
from otaproto.keys import Algorithm, SigningKey, TrustedKeys
from otaproto.limits import DEFAULT_LIMITS, Limits
from otaproto.manifest import Manifest, PayloadKind, decode_manifest, full_manifest

SELF_DESCRIBE_TAG = 55799
MAGIC = b"\xd9\xd9\xf7"  # tag 55799 in its 3-byte head
CONTAINER_VERSION = 1
#: A delta is used only when its patch is at most this share of the full image.
DEFAULT_MAX_DELTA_RATIO = 0.60


@dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact claims, read *without* checking its signature.

    For display only (``shoal artifact inspect``): nothing may act on it.
    """

    manifest: Manifest
    algorithm: Algorithm
    key_id: bytes
    payload_size: int
    artifact_size: int


class VerifiedArtifact:
    """An artifact whose signature and payload digest were checked.

    Built only by :func:`verify_artifact`; constructing it directly raises
    UsageError.
    """

    __slots__ = ("key_id", "manifest", "payload", "signed_manifest")

    def __init__(
        self,
        manifest: Manifest,
        payload: bytes,
        signed_manifest: bytes,
        key_id: bytes,
        *,
        _token: object = None,
    ) -> None:
        if _token is not _VERIFIED:
            raise UsageError("a VerifiedArtifact comes only from verify_artifact()")
        self.manifest = manifest
        self.payload = payload
        #: The COSE_Sign1 bytes, exactly as signed: what a node verifies again.
        self.signed_manifest = signed_manifest
        self.key_id = key_id

    def rebuild_image(
        self, base_image: bytes | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> bytes:
        """The full firmware image, applying the delta to ``base_image`` if needed.

        Raises BaseMismatch when the base is missing or not the signed base,
        DeltaError/LimitExceeded for a bad patch, DigestMismatch when the result
        is not the signed image.
        """
        m = self.manifest
        if m.payload_kind is PayloadKind.FULL:
            return self.payload
        if base_image is None:
            raise BaseMismatch(f"delta needs the base image of version {m.base_version}")
        if hashlib.sha256(base_image).digest() != m.base_digest:
            raise BaseMismatch(
                f"base image is not version {m.base_version} "
                f"(sha256 {hashlib.sha256(base_image).hexdigest()[:16]}..., "
                f"want {(m.base_digest or b'').hex()[:16]}...)"
            )
        image = delta.apply_patch(base_image, self.payload, m.image_size, limits)
        if hashlib.sha256(image).digest() != m.image_digest:
            raise DigestMismatch("rebuilt image digest does not match the manifest")
        return image


_VERIFIED = object()


def build_artifact(manifest: Manifest, payload: bytes, key: SigningKey) -> bytes:
    """Sign ``manifest`` and wrap it with ``payload``.

    Raises UsageError when the payload is not the one the manifest describes.
    """
    if len(payload) != manifest.payload_size or (
        hashlib.sha256(payload).digest() != manifest.payload_digest
    ):
        raise UsageError("payload does not match the manifest's payload size and digest")
    signed = cose.sign_manifest_item(manifest, key)
    return cbor.encode(cbor2.CBORTag(SELF_DESCRIBE_TAG, [CONTAINER_VERSION, signed, payload]))


def build_full_artifact(
    image: bytes,
    *,
    name: str,
    version: str,
    sequence: int,
    device_types: tuple[str, ...],
    key: SigningKey,
    created_s: int,
    metadata: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """A signed artifact carrying ``image`` whole. Raises LimitExceeded, UsageError."""
    if not image:
        raise UsageError("an image cannot be empty")
    if len(image) > limits.max_image_bytes:
        raise LimitExceeded("image", len(image), limits.max_image_bytes)
    manifest = full_manifest(
        image,
        name=name,
        version=version,
        sequence=sequence,
        device_types=device_types,
        created_s=created_s,
        metadata=metadata,
    )
    return build_artifact(manifest, image, key)


@dataclass(frozen=True)
class DeltaOutcome:
    """What :func:`build_delta_artifact` made, and why."""

    artifact: bytes
    used_delta: bool
    patch_size: int
    image_size: int

    @property
    def ratio(self) -> float:
        """Patch size over full image size."""
        return self.patch_size / self.image_size


def build_delta_artifact(
    base: VerifiedArtifact,
    target: VerifiedArtifact,
    key: SigningKey,
    *,
    created_s: int,
    max_ratio: float = DEFAULT_MAX_DELTA_RATIO,
) -> DeltaOutcome:
    """A bsdiff4 delta artifact from ``base`` to ``target`` (both full artifacts).

    When the patch is more than ``max_ratio`` of the target image it is not
    worth the gateway's rebuild: the outcome is then a full artifact of the
    target, re-signed with ``key``, and ``used_delta`` is False. Raises
    UsageError when either input is itself a delta or they share no device type.
    """
    if base.manifest.is_delta or target.manifest.is_delta:
        raise UsageError("both the base and the target must be full artifacts")
    if not set(base.manifest.device_types) & set(target.manifest.device_types):
        raise UsageError("base and target artifacts share no device type")
    base_image, target_image = base.payload, target.payload
    patch = delta.make_patch(base_image, target_image)
    if len(patch) > max_ratio * len(target_image):
        manifest = replace(target.manifest, created_s=created_s)
        return DeltaOutcome(
            build_artifact(manifest, target_image, key), False, len(patch), len(target_image)
        )
    manifest = replace(
        target.manifest,
        payload_kind=PayloadKind.BSDIFF4,
        payload_size=len(patch),
        payload_digest=hashlib.sha256(patch).digest(),
        base_digest=base.manifest.image_digest,
        base_version=base.manifest.version,
        created_s=created_s,
    )
    return DeltaOutcome(build_artifact(manifest, patch, key), True, len(patch), len(target_image))


def _split(data: bytes, limits: Limits) -> tuple[cose.SignedParts, bytes]:
    if len(data) > limits.max_artifact_bytes:
        raise LimitExceeded("artifact", len(data), limits.max_artifact_bytes)
    # cbor2 drops tag 55799 silently on decode, so the magic is checked as bytes.
    if not data.startswith(MAGIC):
        raise MalformedError("artifact", "not a Shoal artifact (no CBOR self-describe tag 55799)")
    body = cbor.decode(data[len(MAGIC) :], "artifact")
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise MalformedError("artifact", "container must be an array of 3")
    version, signed, payload = body
    if version != CONTAINER_VERSION or isinstance(version, bool):
        raise MalformedError("artifact.version", f"container version {version!r} is not 1")
    if not isinstance(payload, bytes):
        raise MalformedError("artifact.payload", "must be a byte string")
    return cose.parse_signed(signed, limits), payload


def inspect_artifact(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ArtifactInfo:
    """Read an artifact's claims without a key. Raises MalformedError, LimitExceeded."""
    parts, payload = _split(data, limits)
    manifest = decode_manifest(parts.manifest_bytes, limits)
    return ArtifactInfo(manifest, parts.algorithm, parts.key_id, len(payload), len(data))


def verify_artifact(
    data: bytes,
    trusted: TrustedKeys,
    *,
    device_type: str | None = None,
    installed_sequence: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedArtifact:
    """Verify an artifact and hand out the only object the rest of Shoal may use.

    Order: size, structure, signature, payload size and digest, device type
    (when given), sequence number newer than ``installed_sequence`` (when
    given). Raises LimitExceeded, MalformedError, UnknownKeyError,
    SignatureError, DigestMismatch, DeviceTypeMismatch, RollbackRefused.
    """
    parts, payload = _split(data, limits)
    manifest = cose.verify_signed(parts, trusted, limits)
    if len(payload) != manifest.payload_size:
        raise DigestMismatch(
            f"payload is {len(payload)} bytes, the manifest signs {manifest.payload_size}"
        )
    if hashlib.sha256(payload).digest() != manifest.payload_digest:
        raise DigestMismatch("payload digest does not match the manifest")
    check_installable(manifest, device_type=device_type, installed_sequence=installed_sequence)
    signed_manifest = cbor.encode(parts.to_item())
    return VerifiedArtifact(manifest, payload, signed_manifest, parts.key_id, _token=_VERIFIED)


def check_installable(
    manifest: Manifest, *, device_type: str | None, installed_sequence: int | None
) -> None:
    """Refuse a manifest for another device type or not newer than what is installed.

    Shared by the gateway and the node. Raises DeviceTypeMismatch, RollbackRefused.
    """
    if device_type is not None and device_type not in manifest.device_types:
        raise DeviceTypeMismatch(
            f"artifact is for {', '.join(manifest.device_types)}, not {device_type}"
        )
    if installed_sequence is not None and manifest.sequence <= installed_sequence:
        raise RollbackRefused(
            f"sequence {manifest.sequence} is not newer than installed {installed_sequence}"
        )
