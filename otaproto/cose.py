"""COSE_Sign1 (RFC 9052 §4.2) over a Shoal manifest.

Rules (spec: ``docs/artifact-format.md`` §Signed manifest):

* ``#6.18([protected: bstr, unprotected: {}, payload: bstr, signature: bstr])``;
  the tag is required and nothing else is accepted in its place.
* The protected header is exactly ``{1: alg, 4: kid}`` in deterministic CBOR,
  with ``alg`` -8 (EdDSA/Ed25519) or -7 (ES256/P-256) and ``kid`` the 8-byte
  key id of :mod:`otaproto.keys`. The unprotected header is empty: everything a
  verifier relies on is signed.
* The signature covers ``["Signature1", protected, h'', payload]`` in
  deterministic CBOR (the Sig_structure, no external AAD).
* Verification order (after python-tuf): structure, key lookup, algorithm
  matches the key, signature, and only then is the manifest decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from otaproto import cbor
from otaproto.errors import LimitExceeded, MalformedError, SignatureError, UnknownKeyError
from otaproto.keys import KEY_ID_BYTES, Algorithm, SigningKey, TrustedKeys
from otaproto.limits import DEFAULT_LIMITS, Limits
from otaproto.manifest import Manifest, decode_manifest

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class SignedParts:
    """The pieces of a COSE_Sign1, structurally checked but not verified."""

    algorithm: Algorithm
    key_id: bytes
    protected: bytes
    manifest_bytes: bytes
    signature: bytes

    def to_item(self) -> cbor2.CBORTag:
        """The tagged COSE_Sign1 item, ready to encode."""
        return cbor2.CBORTag(
            COSE_SIGN1_TAG, [self.protected, {}, self.manifest_bytes, self.signature]
        )


def sign_manifest_item(manifest: Manifest, key: SigningKey) -> cbor2.CBORTag:
    """``manifest`` signed with ``key``, as a tagged COSE_Sign1 item."""
    protected = cbor.encode({HEADER_ALG: key.algorithm.cose_id, HEADER_KID: key.public_key.key_id})
    payload = manifest.to_cbor()
    signature = key.sign(_sig_structure(protected, payload))
    return SignedParts(
        key.algorithm, key.public_key.key_id, protected, payload, signature
    ).to_item()


def sign_manifest(manifest: Manifest, key: SigningKey) -> bytes:
    """The tagged COSE_Sign1 bytes of ``manifest`` signed with ``key``."""
    return cbor.encode(sign_manifest_item(manifest, key))


def parse_signed(value: object, limits: Limits = DEFAULT_LIMITS) -> SignedParts:
    """Check the shape of a decoded COSE_Sign1 item. Raises MalformedError."""
    if not isinstance(value, cbor2.CBORTag):
        raise MalformedError("signed manifest", "expected COSE_Sign1 (CBOR tag 18), found no tag")
    if value.tag != COSE_SIGN1_TAG:
        raise MalformedError(
            "signed manifest", f"expected COSE_Sign1 (CBOR tag 18), found tag {value.tag}"
        )
    body = value.value
    if not isinstance(body, list | tuple) or len(body) != 4:
        raise MalformedError("signed manifest", "COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes):
        raise MalformedError("signed manifest.protected", "must be a byte string")
    if unprotected != {}:
        raise MalformedError("signed manifest.unprotected", "must be an empty map")
    if not isinstance(payload, bytes):
        raise MalformedError("signed manifest.payload", "must be an embedded byte string")
    if len(payload) > limits.max_signed_manifest_bytes:
        raise LimitExceeded("manifest", len(payload), limits.max_signed_manifest_bytes)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise MalformedError("signed manifest.signature", "must be a 64-byte string")
    header = cbor.decode_deterministic(protected, "signed manifest.protected")
    if not isinstance(header, dict) or set(header) != {HEADER_ALG, HEADER_KID}:
        raise MalformedError("signed manifest.protected", "must be exactly {1: alg, 4: kid}")
    alg = header[HEADER_ALG]
    algorithm = Algorithm.from_cose_id(alg) if isinstance(alg, int) else None
    if algorithm is None:
        raise MalformedError("signed manifest.protected", f"algorithm {alg!r} is not -8 or -7")
    kid = header[HEADER_KID]
    if not isinstance(kid, bytes) or len(kid) != KEY_ID_BYTES:
        raise MalformedError("signed manifest.protected", "kid must be an 8-byte string")
    return SignedParts(algorithm, kid, protected, payload, signature)


def decode_signed_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SignedParts:
    """Parse standalone COSE_Sign1 bytes (as a node receives them). Raises MalformedError."""
    if len(data) > limits.max_signed_manifest_bytes:
        raise LimitExceeded("signed manifest", len(data), limits.max_signed_manifest_bytes)
    return parse_signed(cbor.decode(data, "signed manifest"), limits)


def verify_signed(
    parts: SignedParts, trusted: TrustedKeys, limits: Limits = DEFAULT_LIMITS
) -> Manifest:
    """Check the signature, then decode the manifest it covers.

    Raises UnknownKeyError, SignatureError, or MalformedError for a signed but
    invalid manifest.
    """
    key = trusted.get(parts.key_id)
    if key is None:
        raise UnknownKeyError(f"signed by unknown key id {parts.key_id.hex()}")
    if key.algorithm is not parts.algorithm:
        raise SignatureError(
            f"key {parts.key_id.hex()} is {key.algorithm}, artifact claims {parts.algorithm}"
        )
    if not key.verify(parts.signature, _sig_structure(parts.protected, parts.manifest_bytes)):
        raise SignatureError(f"signature does not verify with key {parts.key_id.hex()}")
    return decode_manifest(parts.manifest_bytes, limits)


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor.encode(["Signature1", protected, b"", payload])
