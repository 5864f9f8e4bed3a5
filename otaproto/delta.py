"""bsdiff4 (BSDIFF40) patches, made freely and applied only within bounds.

Rules (spec: ``docs/artifact-format.md`` §Delta payload):

* A patch is ``"BSDIFF40"``, three 8-byte sign-magnitude little-endian
  integers (bzip2 control length, bzip2 diff length, new size), then three
  bzip2 streams: control, diff, extra.
* Before anything is decompressed the new size must equal the *signed* image
  size. Each stream is decompressed with an output cap: the diff and extra
  blocks can never exceed the new size, the control block is capped by
  :attr:`Limits.max_patch_control_bytes`. A bzip2 bomb stops at the cap.
* Every control entry ``(add, copy, seek)`` is checked before the C patcher
  runs: it may not write past the new size nor read past the diff or extra
  blocks, and the entries must fill the image exactly. So a hostile patch can
  neither allocate without limit, write out of bounds, nor loop.
"""

from __future__ import annotations

import bz2

import bsdiff4
import bsdiff4.core

from otaproto.errors import DeltaError, LimitExceeded
from otaproto.limits import DEFAULT_LIMITS, Limits

MAGIC = b"BSDIFF40"
HEADER_BYTES = 32
CONTROL_ENTRY_BYTES = 24


def make_patch(base: bytes, target: bytes) -> bytes:
    """A BSDIFF40 patch from ``base`` to ``target`` (needs ~17x the image in RAM)."""
    patch: bytes = bsdiff4.diff(base, target)
    return patch


def patch_new_size(patch: bytes) -> int:
    """The new size a patch announces. Raises DeltaError for a bad header."""
    if len(patch) < HEADER_BYTES or patch[:8] != MAGIC:
        raise DeltaError("delta payload is not a BSDIFF40 patch")
    return _offtin(patch[24:32])


def apply_patch(
    base: bytes, patch: bytes, image_size: int, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Rebuild the image of ``image_size`` bytes (the signed size) from ``base``.

    Raises DeltaError when the patch is corrupt or would step outside its
    bounds, LimitExceeded when a block decompresses past its cap. The caller
    checks the digest of the result.
    """
    new_size = patch_new_size(patch)
    if new_size != image_size:
        raise DeltaError(f"patch builds {new_size} bytes, the signed image size is {image_size}")
    control_len = _offtin(patch[8:16])
    diff_len = _offtin(patch[16:24])
    if control_len < 0 or diff_len < 0 or HEADER_BYTES + control_len + diff_len > len(patch):
        raise DeltaError("patch block lengths do not fit the patch")
    at = HEADER_BYTES
    control = _bunzip(patch[at : at + control_len], limits.max_patch_control_bytes, "control")
    at += control_len
    diff = _bunzip(patch[at : at + diff_len], image_size, "diff")
    extra = _bunzip(patch[at + diff_len :], image_size, "extra")
    _check_control(control, image_size, len(diff), len(extra))
    try:
        image: bytes = bsdiff4.core.patch(base, image_size, control, diff, extra)
    except (ValueError, TypeError, MemoryError) as exc:
        raise DeltaError(f"patch does not apply: {exc}") from exc
    if len(image) != image_size:
        raise DeltaError(f"patch built {len(image)} bytes, expected {image_size}")
    return image


def _offtin(raw: bytes) -> int:
    magnitude = int.from_bytes(raw, "little") & ~(1 << 63)
    return -magnitude if raw[7] & 0x80 else magnitude


def _bunzip(data: bytes, cap: int, block: str) -> bytes:
    decompressor = bz2.BZ2Decompressor()
    try:
        out = decompressor.decompress(data, max_length=cap + 1)
    except (OSError, ValueError, EOFError) as exc:
        raise DeltaError(f"patch {block} block is not valid bzip2") from exc
    if len(out) > cap:
        raise LimitExceeded(f"patch {block} block", len(out), cap)
    if not decompressor.eof or decompressor.unused_data:
        raise DeltaError(f"patch {block} block is truncated or has trailing bytes")
    return out


def _check_control(control: bytes, new_size: int, diff_len: int, extra_len: int) -> None:
    if len(control) % CONTROL_ENTRY_BYTES:
        raise DeltaError("patch control block is not a whole number of entries")
    new_pos = diff_pos = extra_pos = 0
    for at in range(0, len(control), CONTROL_ENTRY_BYTES):
        add = _offtin(control[at : at + 8])
        copy = _offtin(control[at + 8 : at + 16])
        if add < 0 or copy < 0:
            raise DeltaError(
                f"patch control entry {at // CONTROL_ENTRY_BYTES} has a negative length"
            )
        if new_pos + add + copy > new_size:
            raise DeltaError(
                f"patch control entry {at // CONTROL_ENTRY_BYTES} writes past the image size"
            )
        diff_pos += add
        extra_pos += copy
        new_pos += add + copy
        if diff_pos > diff_len or extra_pos > extra_len:
            raise DeltaError(
                f"patch control entry {at // CONTROL_ENTRY_BYTES} reads past its data blocks"
            )
    if new_pos != new_size:
        raise DeltaError(f"patch fills {new_pos} of {new_size} image bytes")
