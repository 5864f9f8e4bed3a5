"""Synthetic firmware images for benchmarks, the demo and tests.

Random bytes compress and diff like nothing real; these images are built from
a small vocabulary of 32-bit words, as Thumb code is, and the next version
changes scattered words and inserts new code in the middle, shifting what
follows (the case bsdiff is made for).
"""

from __future__ import annotations

import random


def firmware_like(size_bytes: int, seed: int) -> bytes:
    """``size_bytes`` of code-like bytes, the same for the same seed."""
    rng = random.Random(seed)
    words = [rng.getrandbits(32).to_bytes(4, "little") for _ in range(512)]
    body = b"".join(rng.choice(words) for _ in range(size_bytes // 4))
    return body + bytes(size_bytes % 4)


def evolve(
    image: bytes, seed: int, changed_fraction: float = 0.01, insert_bytes: int = 2048
) -> bytes:
    """A plausible next version of ``image``: scattered word changes plus inserted code."""
    rng = random.Random(seed)
    out = bytearray(image)
    for _ in range(int(len(out) * changed_fraction / 4)):
        at = rng.randrange(0, max(1, len(out) - 4)) & ~3
        out[at : at + 4] = rng.getrandbits(32).to_bytes(4, "little")
    middle = (len(out) // 2) & ~3
    return bytes(out[:middle]) + rng.randbytes(insert_bytes) + bytes(out[middle:])
