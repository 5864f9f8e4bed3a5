"""MCUboot images: parse the header and TLVs, verify the hash and the signature.

Rules (MCUboot's image format, field notes §6; spec ``docs/smp.md`` §MCUboot images):

* An image starts with a 32-byte little-endian **header**: magic 0x96f3b83d
  (u32), load address (u32), header size (u16, at least 32: imgtool pads it,
  typically to 0x200), protected TLV area size (u16), image size (u32),
  flags (u32), version major (u8), minor (u8), revision (u16), build (u32),
  then 4 reserved bytes. The firmware follows at ``header size``.
* After the firmware come the **TLV areas**, each opened by a 4-byte info
  ``magic (u16) || total length (u16, the info itself included)``: first the
  *protected* area (magic 0x6908) when the header's protected size is not 0,
  with exactly that total length; then the unprotected area (magic 0x6907).
  Each entry is ``type (u16) || length (u16) || value``; entries must fill
  their area exactly. Bytes after the last area (slot padding) are ignored.
* The **hash** TLV (SHA256, 0x10, 32 bytes; exactly one, unprotected) is the
  SHA-256 of everything before the unprotected area: header, firmware and
  protected TLVs. It is the image's identity in SMP (``"hash"``).
* A **signature** is a KEYHASH TLV (0x01: SHA-256 of the signer's public key
  as SubjectPublicKeyInfo DER, what ``imgtool getpub -e raw`` prints) or a
  PUBKEY TLV (0x02: that DER itself), followed by the signature TLV:
  ED25519 (0x24, 64 bytes, Ed25519 over the 32-byte hash, not over the
  image) or ECDSA_SIG (0x22, an ECDSA P-256 signature of the hash, DER
  ``SEQUENCE {r, s}``, possibly zero-padded to 72 bytes by ``imgtool
  --pad-sig``). A key entry applies to the next signature TLV. This is what
  imgtool 2.x writes without ``--pure``; pure signatures (SIG_PURE, 0x25,
  which sign the image itself and carry no hash TLV), RSA and encrypted
  images are refused.
* **Verification order** (verify before you trust, style §3): sizes against
  the data and the limit, TLV structure, the hash, then, when trusted keys are
  given, at least one signature by one of them. Nothing else in Shoal reads
  an MCUboot image that did not pass :func:`verify_image`.
* Every length is checked against the bytes present and the limit before it
  is used; all failures are :class:`~otaproto.errors.InvalidInput` subclasses
  with a one-line message: MalformedError (structure), LimitExceeded (size),
  DigestMismatch (hash), UnknownKeyError (no signature by a trusted key),
  SignatureError (a trusted key's signature does not verify).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag, StrEnum
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from otaproto.errors import (
    DigestMismatch,
    KeyFormatError,
    LimitExceeded,
    MalformedError,
    SignatureError,
    UnknownKeyError,
    UsageError,
)
from otaproto.limits import DEFAULT_LIMITS

IMAGE_MAGIC: Final = 0x96F3B83D
HEADER_BYTES: Final = 32
TLV_INFO_MAGIC: Final = 0x6907
PROTECTED_TLV_INFO_MAGIC: Final = 0x6908
TLV_INFO_BYTES: Final = 4
TLV_ENTRY_HEADER_BYTES: Final = 4
SHA256_BYTES: Final = 32
ED25519_SIGNATURE_BYTES: Final = 64
#: Longest ECDSA P-256 DER signature, and what ``imgtool --pad-sig`` pads to.
ECDSA_P256_MAX_SIGNATURE_BYTES: Final = 72

_HEADER = struct.Struct("<IIHHIIBBHII")
_TLV_INFO = struct.Struct("<HH")
_TLV_ENTRY = struct.Struct("<HH")


class TlvType(IntEnum):
    """TLV types of MCUboot's image format that Shoal names (others are kept as numbers)."""

    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    SHA384 = 0x11
    SHA512 = 0x12
    RSA2048_PSS = 0x20
    ECDSA_SIG = 0x22
    RSA3072_PSS = 0x23
    ED25519 = 0x24
    SIG_PURE = 0x25
    ENC_RSA2048 = 0x30
    ENC_KW = 0x31
    ENC_EC256 = 0x32
    ENC_X25519 = 0x33
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60


class ImageFlag(IntFlag):
    """Header flags (``ih_flags``)."""

    PIC = 0x0000_0001
    ENCRYPTED_AES128 = 0x0000_0004
    ENCRYPTED_AES256 = 0x0000_0008
    NON_BOOTABLE = 0x0000_0010
    RAM_LOAD = 0x0000_0020
    ROM_FIXED = 0x0000_0100
    COMPRESSED_LZMA1 = 0x0000_0200
    COMPRESSED_LZMA2 = 0x0000_0400
    COMPRESSED_ARM_THUMB = 0x0000_0800


_ENCRYPTED = ImageFlag.ENCRYPTED_AES128 | ImageFlag.ENCRYPTED_AES256


@dataclass(frozen=True, order=True)
class ImageVersion:
    """``major.minor.revision+build`` from the header; ordered by all four fields."""

    major: int
    minor: int
    revision: int
    build: int = 0

    def __str__(self) -> str:
        """The spelling mcumgr's image state uses: ``1.2.3``, or ``1.2.3.4`` with a build."""
        text = f"{self.major}.{self.minor}.{self.revision}"
        return f"{text}.{self.build}" if self.build else text

    @property
    def semver(self) -> str:
        """The spelling imgtool's ``--version`` takes: ``1.2.3+4``."""
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"


@dataclass(frozen=True)
class ImageHeader:
    """The fields of the 32-byte image header."""

    load_addr: int
    header_bytes: int
    protected_tlv_bytes: int
    image_bytes: int
    flags: ImageFlag
    version: ImageVersion

    @property
    def tlv_offset(self) -> int:
        """Where the TLV areas start: after header and firmware."""
        return self.header_bytes + self.image_bytes

    @property
    def hashed_bytes(self) -> int:
        """How many bytes from the start the hash TLV covers."""
        return self.tlv_offset + self.protected_tlv_bytes


@dataclass(frozen=True)
class Tlv:
    """One TLV entry; ``protected`` when it is in the area the hash covers."""

    type: int
    value: bytes
    protected: bool = False


@dataclass(frozen=True)
class McubootImage:
    """A parsed MCUboot image.

    ``hash`` is the value of its SHA256 TLV (the image's identity in SMP),
    ``total_bytes`` the length of header, firmware and both TLV areas (what
    fills a slot; any padding after it is not part of the image).
    ``verified`` is true only for what :func:`verify_image` returns, and
    ``signer_key_hash`` is then the SHA-256 of the trusted key whose
    signature checked (None when verified against no keys, hash only).
    """

    header: ImageHeader
    tlvs: tuple[Tlv, ...]
    hash: bytes
    total_bytes: int
    verified: bool = False
    signer_key_hash: bytes | None = None

    @property
    def version(self) -> ImageVersion:
        return self.header.version

    @property
    def bootable(self) -> bool:
        return not self.header.flags & ImageFlag.NON_BOOTABLE

    @property
    def signed(self) -> bool:
        """Whether it carries any signature TLV (a hash-only image carries none)."""
        return any(tlv.type in _SIGNATURE_TYPES for tlv in self.tlvs)


_SIGNATURE_TYPES = frozenset(
    {
        TlvType.RSA2048_PSS,
        TlvType.ECDSA_SIG,
        TlvType.RSA3072_PSS,
        TlvType.ED25519,
        TlvType.SIG_PURE,
    }
)


class KeyAlgorithm(StrEnum):
    """Signature algorithms Shoal verifies in MCUboot images, named as imgtool's ``-t``."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"

    @property
    def signature_tlv(self) -> TlvType:
        return TlvType.ED25519 if self is KeyAlgorithm.ED25519 else TlvType.ECDSA_SIG


_PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class ImageKey:
    """A public key trusted to sign MCUboot images (what a bootloader is built with).

    ``der`` is the SubjectPublicKeyInfo DER; ``key_hash`` its SHA-256, the
    value of an image's KEYHASH TLV.
    """

    algorithm: KeyAlgorithm
    der: bytes

    @property
    def key_hash(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageKey:
        """Load a key from PEM or DER, public or private (imgtool's ``keygen`` writes a
        private PEM, ``getpub -e pem`` a public PEM, ``getpub -e raw`` the DER).

        Raises KeyFormatError for anything but an Ed25519 or ECDSA P-256 key.
        """
        key = _load_public_key(data)
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if isinstance(key, ed25519.Ed25519PublicKey):
            return cls(KeyAlgorithm.ED25519, der)
        return cls(KeyAlgorithm.ECDSA_P256, der)

    def verify(self, signature: bytes, image_hash: bytes) -> bool:
        """Whether ``signature`` (the signature TLV's value) signs ``image_hash``.

        An ECDSA signature padded with zeros after its DER (``--pad-sig``) is
        accepted. Never raises for any signature bytes.
        """
        key = _load_public_key(self.der)
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                if len(signature) != ED25519_SIGNATURE_BYTES:
                    return False
                key.verify(signature, image_hash)
            else:
                der = _strip_ecdsa_padding(signature)
                if der is None:
                    return False
                key.verify(der, image_hash, ec.ECDSA(Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError):
            return False
        return True


def _load_public_key(data: bytes) -> _PublicKey:
    """The public key in ``data`` (PEM or DER, public or private). Raises KeyFormatError."""
    key = _try_public(data)
    if key is None:
        raise KeyFormatError("not a PEM or DER public or private key")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise KeyFormatError("MCUboot key is neither Ed25519 nor ECDSA P-256")


def _try_public(data: bytes) -> object | None:
    """Whatever public key the first loader that accepts ``data`` yields, else None."""
    problems = (ValueError, TypeError, UnsupportedAlgorithm)
    for load_public in (serialization.load_pem_public_key, serialization.load_der_public_key):
        try:
            return load_public(data)
        except problems:
            pass
    for load_private in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            return load_private(data, password=None).public_key()
        except problems:
            pass
    return None


def _strip_ecdsa_padding(signature: bytes) -> bytes | None:
    """The DER ``SEQUENCE`` at the start of ``signature``, without zero padding after it."""
    if len(signature) < 2 or signature[0] != 0x30 or signature[1] >= 0x80:
        return None
    end = 2 + signature[1]
    if end > len(signature) or len(signature) > ECDSA_P256_MAX_SIGNATURE_BYTES:
        return None
    if any(signature[end:]):
        return None
    return signature[:end]


def read_header(data: bytes) -> ImageHeader:
    """The 32-byte header at the start of ``data``.

    Raises MalformedError when ``data`` is shorter, the magic is wrong, or the
    header size is below 32.
    """
    if len(data) < HEADER_BYTES:
        raise MalformedError("mcuboot header", f"{len(data)} bytes, need {HEADER_BYTES}")
    (magic, load_addr, hdr_size, protect_size, img_size, flags, major, minor, rev, build, _) = (
        _HEADER.unpack_from(data)
    )
    if magic != IMAGE_MAGIC:
        raise MalformedError("mcuboot header.magic", f"{magic:#010x} is not {IMAGE_MAGIC:#010x}")
    if hdr_size < HEADER_BYTES:
        raise MalformedError("mcuboot header.hdr_size", f"{hdr_size} is below {HEADER_BYTES}")
    return ImageHeader(
        load_addr=load_addr,
        header_bytes=hdr_size,
        protected_tlv_bytes=protect_size,
        image_bytes=img_size,
        flags=ImageFlag(flags),
        version=ImageVersion(major, minor, rev, build),
    )


def image_extent(data: bytes, *, max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes) -> int:
    """How many bytes from the start the image takes (header, firmware, both TLV areas).

    Needs only the header and the TLV info headers in ``data``, so a caller
    that reads flash can read the header, then the info, then the whole
    image. Raises MalformedError or LimitExceeded like :func:`parse_image`.
    """
    header = read_header(data)
    end, _, _ = _tlv_bounds(data, header, max_image_bytes)
    return end


def _tlv_bounds(data: bytes, header: ImageHeader, max_image_bytes: int) -> tuple[int, int, int]:
    """(end of the image, start of the protected area or -1, start of the unprotected area).

    Raises LimitExceeded when the declared sizes pass ``max_image_bytes``,
    MalformedError when they pass the data or an info header is wrong.
    """
    if header.hashed_bytes > max_image_bytes:
        raise LimitExceeded("MCUboot image", header.hashed_bytes, max_image_bytes)
    protected_at = -1
    unprotected_at = header.tlv_offset
    if header.protected_tlv_bytes:
        protected_at = header.tlv_offset
        magic, total = _read_info(data, protected_at, "protected TLV info")
        if magic != PROTECTED_TLV_INFO_MAGIC:
            raise MalformedError(
                "mcuboot protected TLV info",
                f"magic {magic:#06x} is not {PROTECTED_TLV_INFO_MAGIC:#06x}",
            )
        if total != header.protected_tlv_bytes:
            raise MalformedError(
                "mcuboot protected TLV info",
                f"length {total} differs from the header's {header.protected_tlv_bytes}",
            )
        unprotected_at = header.hashed_bytes
    magic, total = _read_info(data, unprotected_at, "TLV info")
    if magic != TLV_INFO_MAGIC:
        raise MalformedError("mcuboot TLV info", f"magic {magic:#06x} is not {TLV_INFO_MAGIC:#06x}")
    end = unprotected_at + total
    if end > max_image_bytes:
        raise LimitExceeded("MCUboot image", end, max_image_bytes)
    if end > len(data):
        raise MalformedError("mcuboot TLV area", f"ends at {end}, past the {len(data)} bytes")
    return end, protected_at, unprotected_at


def _read_info(data: bytes, offset: int, what: str) -> tuple[int, int]:
    if offset + TLV_INFO_BYTES > len(data):
        raise MalformedError(
            f"mcuboot {what}", f"at {offset} is past the end of the {len(data)} bytes"
        )
    magic, total = _TLV_INFO.unpack_from(data, offset)
    if total < TLV_INFO_BYTES:
        raise MalformedError(f"mcuboot {what}", f"length {total} is below {TLV_INFO_BYTES}")
    return int(magic), int(total)


def _entries(data: bytes, start: int, end: int, protected: bool) -> list[Tlv]:
    """The TLV entries between ``start`` (after the info) and ``end``. Raises MalformedError."""
    where = "mcuboot protected TLV area" if protected else "mcuboot TLV area"
    entries = []
    offset = start
    while offset < end:
        if offset + TLV_ENTRY_HEADER_BYTES > end:
            raise MalformedError(where, f"an entry header at {offset} runs past the area")
        kind, length = _TLV_ENTRY.unpack_from(data, offset)
        value_at = offset + TLV_ENTRY_HEADER_BYTES
        if value_at + length > end:
            raise MalformedError(where, f"TLV {kind:#04x} of {length} bytes runs past the area")
        entries.append(Tlv(kind, bytes(data[value_at : value_at + length]), protected))
        offset = value_at + length
    return entries


def parse_image(
    data: bytes, *, max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes
) -> McubootImage:
    """Read header and TLVs; checks structure and sizes, not the hash or a signature.

    Use :func:`verify_image` before trusting anything in it. Raises
    MalformedError (bad magic, sizes past the data, TLV areas that do not
    parse, no or several SHA256 TLVs, a pure signature, an encrypted image)
    and LimitExceeded (declared sizes over ``max_image_bytes``).
    """
    header = read_header(data)
    end, protected_at, unprotected_at = _tlv_bounds(data, header, max_image_bytes)
    tlvs: list[Tlv] = []
    if protected_at >= 0:
        tlvs += _entries(data, protected_at + TLV_INFO_BYTES, unprotected_at, protected=True)
    tlvs += _entries(data, unprotected_at + TLV_INFO_BYTES, end, protected=False)
    if header.flags & _ENCRYPTED:
        raise MalformedError("mcuboot header.flags", "encrypted images are not supported")
    if any(tlv.type == TlvType.SIG_PURE for tlv in tlvs):
        raise MalformedError("mcuboot TLV area", "pure signatures (SIG_PURE) are not supported")
    hashes_found = [tlv for tlv in tlvs if tlv.type == TlvType.SHA256]
    if len(hashes_found) != 1 or hashes_found[0].protected:
        raise MalformedError(
            "mcuboot TLV area",
            f"{len(hashes_found)} SHA256 TLVs (one, unprotected, is required)",
        )
    image_hash = hashes_found[0].value
    if len(image_hash) != SHA256_BYTES:
        raise MalformedError("mcuboot SHA256 TLV", f"{len(image_hash)} bytes, not {SHA256_BYTES}")
    return McubootImage(header, tuple(tlvs), image_hash, end)


def verify_image(
    data: bytes,
    trusted_keys: Sequence[ImageKey] | None,
    *,
    max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes,
) -> McubootImage:
    """Parse ``data`` and check its hash, then a signature by one of ``trusted_keys``.

    ``trusted_keys`` None checks the hash only (an unsigned image, or one whose
    signer is not to be checked, as a development bootloader without
    signature checks boots); an empty sequence is a UsageError, so "no keys"
    is never an accident. Returns the image with ``verified`` set. Raises,
    in this order: MalformedError and LimitExceeded from :func:`parse_image`;
    DigestMismatch when the SHA256 TLV is not the hash of the image;
    UnknownKeyError when no signature names a trusted key; SignatureError
    when a trusted key's signature does not verify.
    """
    if trusted_keys is not None and not trusted_keys:
        raise UsageError("no trusted keys given: pass None to check only the hash")
    image = parse_image(data, max_image_bytes=max_image_bytes)
    digest = hashlib.sha256(memoryview(data)[: image.header.hashed_bytes]).digest()
    if digest != image.hash:
        raise DigestMismatch("the MCUboot image's SHA256 TLV is not the hash of the image")
    if trusted_keys is None:
        return replace(image, verified=True)
    signer = _trusted_signer(image, trusted_keys)
    return replace(image, verified=True, signer_key_hash=signer.key_hash)


def _trusted_signer(image: McubootImage, trusted_keys: Sequence[ImageKey]) -> ImageKey:
    """The trusted key whose signature over the hash checks. Raises UnknownKeyError,
    SignatureError."""
    by_hash = {key.key_hash: key for key in trusted_keys}
    named: ImageKey | None = None
    bad_signature = False
    for tlv in image.tlvs:
        if tlv.protected:
            continue
        if tlv.type == TlvType.KEYHASH:
            named = by_hash.get(tlv.value)
        elif tlv.type == TlvType.PUBKEY:
            named = by_hash.get(hashlib.sha256(tlv.value).digest())
        elif tlv.type in (TlvType.ED25519, TlvType.ECDSA_SIG):
            key, named = named, None
            if key is None or key.algorithm.signature_tlv != tlv.type:
                continue
            if key.verify(tlv.value, image.hash):
                return key
            bad_signature = True
    if bad_signature:
        raise SignatureError("the MCUboot image's signature by a trusted key does not verify")
    raise UnknownKeyError("the MCUboot image is not signed by a trusted key")


@dataclass(frozen=True)
class ImageTrust:
    """What a bootloader accepts: images signed by one of ``keys``, and, with
    ``accept_hash_only``, images that carry no signature at all (an MCUboot built
    without signature checks, as in Zephyr's sample fixtures).

    An image with a signature by an unknown key is refused even then. Raises
    UsageError when it would accept nothing (no keys and no hash-only).
    """

    keys: tuple[ImageKey, ...] = ()
    accept_hash_only: bool = False

    def __post_init__(self) -> None:
        if not self.keys and not self.accept_hash_only:
            raise UsageError("an image trust needs a key or accept_hash_only")

    def verify(
        self, data: bytes, *, max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes
    ) -> McubootImage:
        """:func:`verify_image` under this policy; raises what it raises."""
        image = verify_image(data, None, max_image_bytes=max_image_bytes)
        if self.accept_hash_only and not image.signed:
            return image
        if not self.keys:
            raise UnknownKeyError("signed MCUboot images are not accepted: no trusted keys")
        return verify_image(data, self.keys, max_image_bytes=max_image_bytes)
