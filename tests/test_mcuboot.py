"""otaproto.mcuboot against images and keys made by the real ``imgtool`` (PyPI).

The helpers at the top (:func:`imgtool`, :class:`ImgtoolKeys`, :func:`sign`)
are shared with tests/test_smp_node.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaproto import mcuboot
from otaproto.errors import (
    DigestMismatch,
    InvalidInput,
    KeyFormatError,
    LimitExceeded,
    MalformedError,
    SignatureError,
    UnknownKeyError,
    UsageError,
)
from shoal.synthetic import firmware_like

SLOT_BYTES = 0x10000
HEADER_SIZE = 0x200


def imgtool(*args: str | Path) -> str:
    """Run the imgtool CLI of this interpreter; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "imgtool.main", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


@dataclass(frozen=True)
class ImgtoolKeys:
    """Key pairs made by ``imgtool keygen`` in one folder."""

    folder: Path

    def path(self, name: str, kind: str = "ed25519") -> Path:
        path = self.folder / f"{name}.pem"
        if not path.exists():
            imgtool("keygen", "-k", path, "-t", kind)
        return path

    def trusted(self, name: str, kind: str = "ed25519") -> mcuboot.ImageKey:
        """The public key as a node is provisioned with it (``getpub -e pem``)."""
        public = self.folder / f"{name}.pub.pem"
        if not public.exists():
            public.write_text(imgtool("getpub", "-k", self.path(name, kind), "-e", "pem"))
        return mcuboot.ImageKey.from_bytes(public.read_bytes())


def sign(
    folder: Path,
    firmware: bytes,
    version: str,
    key: Path | None,
    *extra: str,
    slot_bytes: int = SLOT_BYTES,
) -> bytes:
    """``imgtool sign`` of ``firmware`` (hash-only without a key); the image file's bytes."""
    stem = hashlib.sha256(firmware + version.encode() + str(key).encode() + str(extra).encode())
    source = folder / f"{stem.hexdigest()[:16]}.bin"
    target = source.with_suffix(".signed")
    source.write_bytes(firmware)
    args: list[str | Path] = [
        "sign", "--header-size", hex(HEADER_SIZE), "--pad-header", "--align", "4",
        "--version", version, "--slot-size", hex(slot_bytes), *extra,
    ]  # fmt: skip
    if key is not None:
        args += ["-k", key]
    imgtool(*args, source, target)
    return target.read_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ImgtoolKeys:
    return ImgtoolKeys(tmp_path_factory.mktemp("imgtool-keys"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imgtool-images")


FIRMWARE = firmware_like(5000, seed=3)


@pytest.fixture(scope="module")
def ed_image(keys: ImgtoolKeys, work: Path) -> bytes:
    return sign(work, FIRMWARE, "1.2.3+4", keys.path("ed"))


@pytest.fixture(scope="module")
def ec_image(keys: ImgtoolKeys, work: Path) -> bytes:
    return sign(work, FIRMWARE, "2.0.0", keys.path("ec", "ecdsa-p256"))


def digest_from_imgtool(work: Path, image: bytes, key: Path | None) -> str:
    path = work / "to-verify.bin"
    path.write_bytes(image)
    args: list[str | Path] = ["verify", path] if key is None else ["verify", "-k", key, path]
    found = re.search(r"Image digest: ([0-9a-f]{64})", imgtool(*args))
    assert found is not None
    return found.group(1)


# -- parsing ----------------------------------------------------------------------------


def test_parse_reads_header_version_and_tlvs(ed_image: bytes, keys: ImgtoolKeys) -> None:
    image = mcuboot.parse_image(ed_image)
    assert image.header.header_bytes == HEADER_SIZE
    assert image.header.image_bytes == len(FIRMWARE)
    assert image.header.protected_tlv_bytes == 0
    assert image.version == mcuboot.ImageVersion(1, 2, 3, 4)
    assert str(image.version) == "1.2.3.4" and image.version.semver == "1.2.3+4"
    assert image.total_bytes == len(ed_image)
    assert image.bootable and image.signed and not image.verified
    kind = mcuboot.TlvType
    assert [t.type for t in image.tlvs] == [kind.SHA256, kind.KEYHASH, kind.ED25519]
    assert ed_image[HEADER_SIZE : HEADER_SIZE + len(FIRMWARE)] == FIRMWARE
    assert image.tlvs[1].value == keys.trusted("ed").key_hash


def test_hash_and_keyhash_equal_imgtools(ed_image: bytes, keys: ImgtoolKeys, work: Path) -> None:
    image = mcuboot.verify_image(ed_image, [keys.trusted("ed")])
    assert image.hash.hex() == digest_from_imgtool(work, ed_image, keys.path("ed"))
    raw_hash = subprocess.run(
        [sys.executable, "-m", "imgtool.main", "getpubhash", "-k", keys.path("ed"), "-e", "raw"],
        check=True,
        capture_output=True,
    ).stdout
    assert image.signer_key_hash == raw_hash == keys.trusted("ed").key_hash


def test_version_order_and_spelling() -> None:
    assert str(mcuboot.ImageVersion(1, 0, 0)) == "1.0.0"
    assert mcuboot.ImageVersion(1, 2, 3, 0) < mcuboot.ImageVersion(1, 2, 3, 1)
    assert mcuboot.ImageVersion(1, 10, 0) > mcuboot.ImageVersion(1, 9, 300)


# -- verifying good images ------------------------------------------------------------------


def test_verify_ed25519_and_ecdsa(ed_image: bytes, ec_image: bytes, keys: ImgtoolKeys) -> None:
    both = [keys.trusted("ed"), keys.trusted("ec", "ecdsa-p256")]
    assert mcuboot.verify_image(ed_image, both).signer_key_hash == both[0].key_hash
    verified = mcuboot.verify_image(ec_image, both)
    assert verified.verified and verified.signer_key_hash == both[1].key_hash
    assert str(verified.version) == "2.0.0"


def test_keys_load_from_private_pem_public_pem_and_der(keys: ImgtoolKeys, work: Path) -> None:
    for name, kind in (("ed", "ed25519"), ("ec", "ecdsa-p256")):
        private = mcuboot.ImageKey.from_bytes(keys.path(name, kind).read_bytes())
        der_path = work / f"{name}.der"
        imgtool("getpub", "-k", keys.path(name, kind), "-e", "raw", "-o", der_path)
        from_der = mcuboot.ImageKey.from_bytes(der_path.read_bytes())
        assert private == from_der == keys.trusted(name, kind)
        assert private.algorithm.value == kind


def test_keys_refuse_rsa_and_garbage(keys: ImgtoolKeys) -> None:
    with pytest.raises(KeyFormatError, match="neither"):
        mcuboot.ImageKey.from_bytes(keys.path("rsa", "rsa-2048").read_bytes())
    with pytest.raises(KeyFormatError):
        mcuboot.ImageKey.from_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


def test_hash_only_image(keys: ImgtoolKeys, work: Path) -> None:
    image = sign(work, FIRMWARE, "1.0.0", None)
    verified = mcuboot.verify_image(image, None)
    assert verified.verified and not verified.signed and verified.signer_key_hash is None
    assert verified.hash.hex() == digest_from_imgtool(work, image, None)
    with pytest.raises(UnknownKeyError):
        mcuboot.verify_image(image, [keys.trusted("ed")])
    with pytest.raises(UsageError):
        mcuboot.verify_image(image, [])


def test_protected_tlvs_padding_full_key_and_padded_signature(
    keys: ImgtoolKeys, work: Path
) -> None:
    trusted = [keys.trusted("ed"), keys.trusted("ec", "ecdsa-p256")]
    counter = sign(work, FIRMWARE, "1.0.1", keys.path("ed"), "--security-counter", "7")
    parsed = mcuboot.verify_image(counter, trusted)
    assert parsed.header.protected_tlv_bytes == 12
    assert (parsed.tlvs[0].type, parsed.tlvs[0].protected) == (mcuboot.TlvType.SEC_CNT, True)
    assert parsed.hash.hex() == digest_from_imgtool(work, counter, keys.path("ed"))
    padded = sign(work, FIRMWARE, "1.0.2", keys.path("ed"), "--pad")
    assert len(padded) == SLOT_BYTES
    assert mcuboot.verify_image(padded, trusted).total_bytes < SLOT_BYTES
    assert mcuboot.image_extent(padded) == mcuboot.parse_image(padded).total_bytes
    full = sign(
        work, FIRMWARE, "1.0.3", keys.path("ec", "ecdsa-p256"), "--public-key-format", "full"
    )
    assert mcuboot.TlvType.PUBKEY in [t.type for t in mcuboot.parse_image(full).tlvs]
    assert mcuboot.verify_image(full, trusted).signer_key_hash == trusted[1].key_hash
    pad_sig = sign(work, FIRMWARE, "1.0.4", keys.path("ec", "ecdsa-p256"), "--pad-sig")
    tlvs = mcuboot.parse_image(pad_sig).tlvs
    signature = next(t for t in tlvs if t.type == mcuboot.TlvType.ECDSA_SIG)
    assert len(signature.value) == mcuboot.ECDSA_P256_MAX_SIGNATURE_BYTES
    assert mcuboot.verify_image(pad_sig, trusted).signer_key_hash == trusted[1].key_hash


# -- refusing bad images ----------------------------------------------------------------------


def test_wrong_key_is_refused(ed_image: bytes, ec_image: bytes, keys: ImgtoolKeys) -> None:
    with pytest.raises(UnknownKeyError):
        mcuboot.verify_image(ed_image, [keys.trusted("other")])
    with pytest.raises(UnknownKeyError):
        mcuboot.verify_image(ec_image, [keys.trusted("ed")])


def flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


def test_flipped_bytes_are_refused(ed_image: bytes, keys: ImgtoolKeys) -> None:
    trusted = [keys.trusted("ed")]
    image = mcuboot.parse_image(ed_image)
    tlv_at = image.header.hashed_bytes
    with pytest.raises(DigestMismatch):
        mcuboot.verify_image(flip(ed_image, HEADER_SIZE + 100), trusted)  # firmware
    with pytest.raises(DigestMismatch):
        mcuboot.verify_image(flip(ed_image, 20), trusted)  # version major
    with pytest.raises(DigestMismatch):
        mcuboot.verify_image(flip(ed_image, 40), trusted)  # header padding
    with pytest.raises(MalformedError, match="magic"):
        mcuboot.verify_image(flip(ed_image, 0), trusted)
    sha256_at = tlv_at + mcuboot.TLV_INFO_BYTES + mcuboot.TLV_ENTRY_HEADER_BYTES
    with pytest.raises(DigestMismatch):
        mcuboot.verify_image(flip(ed_image, sha256_at + 5), trusted)  # the SHA256 TLV
    keyhash_at = sha256_at + mcuboot.SHA256_BYTES + mcuboot.TLV_ENTRY_HEADER_BYTES
    with pytest.raises(UnknownKeyError):
        mcuboot.verify_image(flip(ed_image, keyhash_at), trusted)
    with pytest.raises(SignatureError):
        mcuboot.verify_image(flip(ed_image, len(ed_image) - 1), trusted)  # the signature
    with pytest.raises(MalformedError):
        mcuboot.verify_image(flip(ed_image, tlv_at), trusted)  # TLV info magic


def test_ecdsa_signature_flip_is_refused(ec_image: bytes, keys: ImgtoolKeys) -> None:
    with pytest.raises(SignatureError):
        mcuboot.verify_image(flip(ec_image, len(ec_image) - 3), [keys.trusted("ec", "ecdsa-p256")])


def test_truncated_and_garbage_are_refused(ed_image: bytes, keys: ImgtoolKeys) -> None:
    header_bytes = mcuboot.HEADER_BYTES
    for size in (0, 10, header_bytes - 1, header_bytes, HEADER_SIZE + 10, len(ed_image) - 1):
        with pytest.raises(MalformedError):
            mcuboot.verify_image(ed_image[:size], [keys.trusted("ed")])
    with pytest.raises(MalformedError):
        mcuboot.parse_image(bytes(4096))
    with pytest.raises(MalformedError):
        mcuboot.parse_image(b"\xff" * 4096)


def with_u32(data: bytes, at: int, value: int, fmt: str = "<I") -> bytes:
    changed = bytearray(data)
    struct.pack_into(fmt, changed, at, value)
    return bytes(changed)


def test_oversized_lengths_are_refused_before_use(ed_image: bytes) -> None:
    with pytest.raises(LimitExceeded):
        mcuboot.parse_image(with_u32(ed_image, 12, 0xFFFF_FFF0))  # img_size
    with pytest.raises(LimitExceeded):
        mcuboot.parse_image(ed_image, max_image_bytes=1000)
    with pytest.raises(MalformedError, match="past the end"):
        mcuboot.parse_image(with_u32(ed_image, 12, len(ed_image)))
    with pytest.raises(MalformedError, match="below 32"):
        mcuboot.parse_image(with_u32(ed_image, 8, 16, "<H"))  # hdr_size
    with pytest.raises(MalformedError):
        mcuboot.parse_image(with_u32(ed_image, 10, 12, "<H"))  # protect_tlv_size, none there
    tlv_at = mcuboot.parse_image(ed_image).header.hashed_bytes
    with pytest.raises(MalformedError, match="past the"):
        mcuboot.parse_image(with_u32(ed_image, tlv_at + 2, 0xFFFF, "<H"))  # TLV total
    with pytest.raises(MalformedError, match="runs past"):
        mcuboot.parse_image(with_u32(ed_image, tlv_at + 6, 0x4000, "<H"))  # first entry length
    with pytest.raises(MalformedError, match="below 4"):
        mcuboot.parse_image(with_u32(ed_image, tlv_at + 2, 2, "<H"))


def test_encrypted_and_pure_images_are_refused(
    ed_image: bytes, keys: ImgtoolKeys, work: Path
) -> None:
    with pytest.raises(MalformedError, match="encrypted"):
        mcuboot.parse_image(with_u32(ed_image, 16, mcuboot.ImageFlag.ENCRYPTED_AES128))
    pure = sign(work, FIRMWARE, "1.0.0", keys.path("ed"), "--pure")
    with pytest.raises(MalformedError, match="pure"):
        mcuboot.verify_image(pure, [keys.trusted("ed")])


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInput):
        mcuboot.verify_image(b"\x3d\xb8\xf3\x96" + data, None)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_change_is_refused_or_outside_the_image(
    ed_image: bytes, keys: ImgtoolKeys, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(ed_image) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != ed_image[at]))
    changed = bytearray(ed_image)
    changed[at] = value
    try:
        mcuboot.verify_image(bytes(changed), [keys.trusted("ed")])
    except InvalidInput:
        return
    # Every byte of an image is covered by the hash, the signature or the structure.
    raise AssertionError(f"a change at {at} passed verification")
