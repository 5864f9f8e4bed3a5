"""Resumable artifact downloads: blocks land in a file, a bitmap on disk says which.

Rules:

* A download of artifact ``D`` (the SHA-256 of the artifact file) lives in
  ``DIR/D.part`` (the file, preallocated to its size) and ``DIR/D.map`` (one
  byte per block, 1 = written). A block is written to the part file first and
  marked in the map after, each with one ``pwrite``: a crash between the two
  costs that block once more, never a wrong byte accepted as done.
* A restarted gateway reopens both and asks only for the blocks not marked: it
  never starts over.
* When every block is in, the whole file's SHA-256 must be ``D``; a mismatch
  clears the map (the blocks came from a broken or hostile source) and the
  download starts again.
* Sizes are bounded before anything is allocated: the artifact size by
  :attr:`Limits.max_artifact_bytes`, each block by the announced block size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from otaproto.errors import DigestMismatch, LimitExceeded, MalformedError
from otaproto.fleet import ArtifactRef
from otaproto.limits import DEFAULT_LIMITS


class Download:
    """One artifact being fetched block by block; see the module rules."""

    def __init__(self, folder: Path, ref: ArtifactRef) -> None:
        if ref.size > DEFAULT_LIMITS.max_artifact_bytes:
            raise LimitExceeded("artifact", ref.size, DEFAULT_LIMITS.max_artifact_bytes)
        if ref.size == 0:
            raise MalformedError("artifact.size", "an artifact cannot be empty")
        folder.mkdir(parents=True, exist_ok=True)
        self.ref = ref
        name = ref.digest.hex()
        self.part_path = folder / f"{name}.part"
        self.map_path = folder / f"{name}.map"
        self.done_path = folder / f"{name}.art"
        self._part = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._map = os.open(self.map_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._part).st_size != ref.size:
            os.ftruncate(self._part, ref.size)
        if os.fstat(self._map).st_size != ref.block_count:
            os.ftruncate(self._map, 0)
            os.ftruncate(self._map, ref.block_count)
        self._have = bytearray(os.pread(self._map, ref.block_count, 0))
        #: Blocks asked for and not arrived yet -> when they were asked for. In
        #: memory only: a restarted gateway has nothing in flight.
        self.asked: dict[int, float] = {}

    @property
    def complete(self) -> bool:
        return all(self._have)

    @property
    def bytes_have(self) -> int:
        full = sum(self._have)
        last = self.ref.block_count - 1
        if self._have[last]:
            return (full - 1) * self.ref.block_bytes + (self.ref.size - last * self.ref.block_bytes)
        return full * self.ref.block_bytes

    def missing(self, limit: int) -> list[int]:
        """Up to ``limit`` block indices not yet written, lowest first."""
        out: list[int] = []
        for index, have in enumerate(self._have):
            if not have:
                out.append(index)
                if len(out) == limit:
                    break
        return out

    def put(self, index: int, data: bytes) -> bool:
        """Store one block. False when it was already there. Raises MalformedError."""
        if not 0 <= index < self.ref.block_count:
            raise MalformedError("block.index", f"{index} is outside 0..{self.ref.block_count - 1}")
        expected = min(self.ref.block_bytes, self.ref.size - index * self.ref.block_bytes)
        if len(data) != expected:
            raise MalformedError("block.data", f"block {index}: {len(data)} bytes, not {expected}")
        self.asked.pop(index, None)
        if self._have[index]:
            return False
        os.pwrite(self._part, data, index * self.ref.block_bytes)
        os.pwrite(self._map, b"\x01", index)
        self._have[index] = 1
        return True

    def finish(self) -> bytes:
        """The whole artifact, once its digest checks. Raises DigestMismatch (and starts over)."""
        data = os.pread(self._part, self.ref.size, 0)
        if hashlib.sha256(data).digest() != self.ref.digest:
            self._have = bytearray(self.ref.block_count)
            self.asked.clear()
            os.pwrite(self._map, bytes(self.ref.block_count), 0)
            raise DigestMismatch("downloaded artifact does not match its digest: fetching again")
        return data

    def close(self) -> None:
        for fd in (self._part, self._map):
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        """Close and delete the files (after the artifact was used)."""
        self.close()
        for path in (self.part_path, self.map_path):
            path.unlink(missing_ok=True)
