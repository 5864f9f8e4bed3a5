"""Release keys: Ed25519 (default) and ECDSA P-256, in PEM, with COSE key ids.

Keys come in and go out as bytes (PKCS#8 PEM for private keys,
SubjectPublicKeyInfo PEM for public keys, the formats ``openssl`` reads), so
that this module does no I/O. The key id carried in an artifact's COSE header
is the first 8 bytes of SHA-256 over the raw public key: the 32-byte Ed25519
key, or the 65-byte uncompressed SEC1 point of a P-256 key. A node computes
the same id from the key it was provisioned with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from otaproto.errors import KeyFormatError, UsageError

KEY_ID_BYTES = 8
P256_COORD_BYTES = 32


class Algorithm(StrEnum):
    """Signature algorithms, named as on the CLI; ``cose_id`` is the COSE value."""

    ED25519 = "ed25519"
    P256 = "p256"

    @property
    def cose_id(self) -> int:
        """COSE algorithm identifier (RFC 9053): EdDSA = -8, ES256 = -7."""
        return -8 if self is Algorithm.ED25519 else -7

    @classmethod
    def from_cose_id(cls, cose_id: int) -> Algorithm | None:
        """The algorithm for a COSE identifier, or None when Shoal does not accept it."""
        return {-8: cls.ED25519, -7: cls.P256}.get(cose_id)


_PublicKeyObject = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_PrivateKeyObject = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key: algorithm, raw bytes and the key id derived from them."""

    algorithm: Algorithm
    raw: bytes
    _key: _PublicKeyObject = field(repr=False, compare=False)

    @property
    def key_id(self) -> bytes:
        """The 8-byte COSE key id (``kid``, header label 4)."""
        return hashlib.sha256(self.raw).digest()[:KEY_ID_BYTES]

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` (COSE form: raw, r||s for ECDSA) signs ``message``."""
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, message)
            else:
                if len(signature) != 2 * P256_COORD_BYTES:
                    return False
                r = int.from_bytes(signature[:P256_COORD_BYTES], "big")
                s = int.from_bytes(signature[P256_COORD_BYTES:], "big")
                self._key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        """Load a public key (or take the public half of a private key) from PEM.

        Raises KeyFormatError for anything but an Ed25519 or P-256 key.
        """
        try:
            key: object = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            try:
                key = serialization.load_pem_private_key(pem, password=None).public_key()
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise KeyFormatError("not a PEM public or private key") from exc
        return _wrap_public(key)


@dataclass(frozen=True)
class SigningKey:
    """A private release key. Only the release pipeline holds one."""

    algorithm: Algorithm
    _key: _PrivateKeyObject = field(repr=False)

    @classmethod
    def generate(cls, algorithm: Algorithm = Algorithm.ED25519) -> SigningKey:
        """A new random key."""
        if algorithm is Algorithm.ED25519:
            return cls(algorithm, ed25519.Ed25519PrivateKey.generate())
        return cls(algorithm, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM private key. Raises KeyFormatError."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFormatError("not an unencrypted PEM private key") from exc
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return cls(Algorithm.ED25519, key)
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return cls(Algorithm.P256, key)
        raise KeyFormatError("private key is neither Ed25519 nor ECDSA P-256")

    @classmethod
    def from_ed25519_seed(cls, seed: bytes) -> SigningKey:
        """A deterministic Ed25519 key from a 32-byte seed (for golden test vectors)."""
        if len(seed) != 32:
            raise UsageError("an Ed25519 seed is 32 bytes")
        return cls(Algorithm.ED25519, ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return _wrap_public(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        """A COSE-form signature: 64 bytes for both algorithms (ECDSA as r||s)."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        der = self._key.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(P256_COORD_BYTES, "big") + s.to_bytes(P256_COORD_BYTES, "big")


def _wrap_public(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(Algorithm.ED25519, raw, key)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        raw = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return PublicKey(Algorithm.P256, raw, key)
    raise KeyFormatError("public key is neither Ed25519 nor ECDSA P-256")


class TrustedKeys:
    """Several trusted public keys at once, looked up by key id.

    Rotation works by trusting the old and the new key for a while.
    """

    def __init__(self, keys: list[PublicKey]) -> None:
        if not keys:
            raise UsageError("at least one trusted key is needed")
        self._by_id: dict[bytes, PublicKey] = {k.key_id: k for k in keys}

    def get(self, key_id: bytes) -> PublicKey | None:
        """The trusted key with this id, or None."""
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)
