"""The artifact store: signed artifact files on disk, their manifests in the database.

Rules (architecture.md §Security model; ``docs/artifact-format.md``):

* Nothing is stored that :func:`~otaproto.artifact.verify_artifact` did not
  accept with the orchestrator's trusted keys. The orchestrator holds public
  keys only: it can refuse firmware, never make it.
* An artifact is named by the SHA-256 of its file (what FETCH and the
  ARTIFACT_REF ``digest`` carry) and kept as ``artifacts/<hex digest>``,
  written atomically before its row is inserted, so a row never names a
  missing file. Uploading the same bytes again is a no-op that returns the
  stored record.
* A delta is linked to the full artifact of the same image digest
  (``full_digest``: what a gateway without the base fetches instead) and to
  the full artifact of its base image (``base_full_digest``), whichever is
  uploaded first: later uploads fill in the links of earlier ones.
* Verification comes first even for bytes already stored, so an artifact
  signed by a key that is no longer trusted is refused, not handed back.
* Each artifact's block size is fixed when it is stored, so block indices in
  commands already sent stay valid even if the orchestrator is restarted with
  another ``block_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from orchestrator.db import check_sql_int, one
from otaio.files import write_atomic
from otaproto import fleet
from otaproto.artifact import verify_artifact
from otaproto.errors import InvalidInput, LimitExceeded, MalformedError, UsageError
from otaproto.keys import TrustedKeys
from otaproto.limits import DEFAULT_LIMITS
from otaproto.manifest import PayloadKind

log = logging.getLogger("shoal.orchestrator")

ARTIFACTS_DIR = "artifacts"
HEX_DIGEST_CHARS = 2 * fleet.DIGEST_BYTES


@dataclass(frozen=True)
class ArtifactRecord:
    """A stored, verified artifact: what its manifest says and where its file is."""

    digest: bytes  #: SHA-256 of the artifact file
    name: str
    version: str
    sequence: int
    device_types: tuple[str, ...]
    payload_kind: PayloadKind
    image_digest: bytes
    image_size: int
    base_digest: bytes | None
    base_version: str | None
    size: int  #: bytes of the artifact file
    block_bytes: int
    created: float
    full_digest: bytes | None  #: delta: the full artifact of the same image, when stored
    base_full_digest: bytes | None  #: delta: the full artifact of its base image, when stored

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def is_delta(self) -> bool:
        return self.payload_kind is PayloadKind.BSDIFF4

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_bytes)

    def ref(self) -> fleet.ArtifactRef:
        """What a deploy command tells the gateway to fetch."""
        return fleet.ArtifactRef(
            self.digest, self.size, self.block_bytes, str(self.payload_kind), self.base_digest
        )

    def to_public(self) -> dict[str, Any]:
        """The artifact as the operator API shows it (digests in hex)."""
        return {
            "digest": self.hex, "name": self.name, "version": self.version,
            "sequence": self.sequence, "device_types": list(self.device_types),
            "kind": str(self.payload_kind), "image_digest": self.image_digest.hex(),
            "image_size": self.image_size, "size": self.size, "block_bytes": self.block_bytes,
            "created": self.created, "base_digest": _hex(self.base_digest),
            "base_version": self.base_version, "full_digest": _hex(self.full_digest),
            "base_full_digest": _hex(self.base_full_digest),
        }  # fmt: skip


def parse_hex_digest(value: Any, what: str) -> bytes:
    """A 64-character hex SHA-256 as bytes. Raises MalformedError."""
    if not isinstance(value, str) or len(value) != HEX_DIGEST_CHARS:
        raise MalformedError(what, f"must be {HEX_DIGEST_CHARS} hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise MalformedError(what, f"must be {HEX_DIGEST_CHARS} hex characters") from exc


class ArtifactStore:
    """Verified artifacts under ``directory``, indexed in ``db``. Not thread-safe."""

    def __init__(
        self,
        db: Database,
        directory: Path,
        trusted: TrustedKeys,
        clock: Callable[[], float],
        block_bytes: int,
    ) -> None:
        if not 0 < block_bytes <= fleet.MAX_BLOCK_BYTES:
            raise UsageError(f"block_bytes must be 1..{fleet.MAX_BLOCK_BYTES}")
        self._db = db
        self._dir = directory
        self._trusted = trusted
        self._clock = clock
        self._block_bytes = block_bytes
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, data: bytes) -> ArtifactRecord:
        """Verify and store an artifact; the stored record if these bytes are already here.

        The caller holds the transaction. Raises the InvalidInput family:
        LimitExceeded, MalformedError, UnknownKeyError, SignatureError,
        DigestMismatch (all from verify_artifact), and InvalidInput when the
        file cannot be written.
        """
        if len(data) > DEFAULT_LIMITS.max_artifact_bytes:
            raise LimitExceeded("artifact", len(data), DEFAULT_LIMITS.max_artifact_bytes)
        manifest = verify_artifact(data, self._trusted).manifest
        check_sql_int(manifest.sequence, "manifest.sequence")
        digest = hashlib.sha256(data).digest()
        existing = self.get(digest)
        if existing is not None:
            return existing
        write_atomic(self._path(digest), data, mode=0o644)
        full_digest = base_full = None
        if manifest.is_delta:
            full_digest = self._full_of(manifest.image_digest)
            base_full = self._full_of(manifest.base_digest or b"")
        self._db.execute(
            "INSERT INTO artifacts (digest, name, version, sequence, device_types, payload_kind,"
            " image_digest, image_size, base_digest, base_version, size, block_bytes, created,"
            " full_digest, base_full_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                digest.hex(), manifest.name, manifest.version, manifest.sequence,
                json.dumps(list(manifest.device_types)), str(manifest.payload_kind),
                manifest.image_digest.hex(), manifest.image_size, _hex(manifest.base_digest),
                manifest.base_version, len(data), self._block_bytes, self._clock(),
                _hex(full_digest), _hex(base_full),
            ],
        )  # fmt: skip
        if not manifest.is_delta:
            image = manifest.image_digest.hex()
            self._db.execute(
                "UPDATE artifacts SET full_digest = ? WHERE payload_kind = ? AND image_digest = ?"
                " AND full_digest IS NULL",
                [digest.hex(), str(PayloadKind.BSDIFF4), image],
            )
            self._db.execute(
                "UPDATE artifacts SET base_full_digest = ? WHERE payload_kind = ?"
                " AND base_digest = ? AND base_full_digest IS NULL",
                [digest.hex(), str(PayloadKind.BSDIFF4), image],
            )
        log.info(
            "artifact %s stored: %s %s (%s, %d bytes)",
            digest.hex()[:16], manifest.name, manifest.version, manifest.payload_kind, len(data),
        )  # fmt: skip
        record = self.get(digest)
        if record is None:  # pragma: no cover - the row was inserted just above
            raise UsageError("artifact row vanished inside its own transaction")
        return record

    def get(self, digest: bytes) -> ArtifactRecord | None:
        """The artifact whose file has this SHA-256, or None."""
        row = one(self._db, "SELECT * FROM artifacts WHERE digest = ?", [digest.hex()])
        return None if row is None else _record(row)

    def find_full(self, digest: bytes) -> ArtifactRecord | None:
        """The artifact whose file has this SHA-256, else the full artifact of this image."""
        record = self.get(digest)
        if record is not None:
            return record
        full = self._full_of(digest)
        return None if full is None else self.get(full)

    def all(self) -> list[ArtifactRecord]:
        """Every stored artifact, oldest first."""
        rows = self._db.query("SELECT * FROM artifacts ORDER BY created, digest")
        return [_record(r) for r in rows]

    def deltas_to(self, image_digest: bytes) -> list[ArtifactRecord]:
        """The deltas that rebuild this image, smallest first."""
        rows = self._db.query(
            "SELECT * FROM artifacts WHERE payload_kind = ? AND image_digest = ?"
            " ORDER BY size, digest",
            [str(PayloadKind.BSDIFF4), image_digest.hex()],
        )
        return [_record(r) for r in rows]

    def read_block(self, record: ArtifactRecord, index: int) -> bytes:
        """Block ``index`` of a stored artifact (at most its block size).

        Raises UsageError for an index past the end (callers check first) and
        InvalidInput when the file is missing, unreadable or not the stored size.
        """
        if not 0 <= index < record.block_count:
            raise UsageError(f"block {index} is past the end of artifact {record.hex[:16]}")
        offset = index * record.block_bytes
        want = min(record.block_bytes, record.size - offset)
        path = self._path(record.digest)
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != record.size:
                    raise InvalidInput(f"artifact file {path} is {size} bytes, not {record.size}")
                handle.seek(offset)
                data = handle.read(want)
        except OSError as exc:
            raise InvalidInput(f"cannot read artifact file {path}: {exc.strerror or exc}") from exc
        if len(data) != want:
            raise InvalidInput(f"artifact file {path} ended inside block {index}")
        return data

    def _path(self, digest: bytes) -> Path:
        return self._dir / digest.hex()

    def _full_of(self, image_digest: bytes) -> bytes | None:
        row = one(
            self._db,
            "SELECT digest FROM artifacts WHERE payload_kind = ? AND image_digest = ?"
            " ORDER BY created, digest LIMIT 1",
            [str(PayloadKind.FULL), image_digest.hex()],
        )
        return None if row is None else bytes.fromhex(row["digest"])


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _unhex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def _record(row: dict[str, Any]) -> ArtifactRecord:
    return ArtifactRecord(
        digest=bytes.fromhex(row["digest"]), name=row["name"], version=row["version"],
        sequence=row["sequence"], device_types=tuple(json.loads(row["device_types"])),
        payload_kind=PayloadKind(row["payload_kind"]),
        image_digest=bytes.fromhex(row["image_digest"]), image_size=row["image_size"],
        base_digest=_unhex(row["base_digest"]), base_version=row["base_version"],
        size=row["size"], block_bytes=row["block_bytes"], created=row["created"],
        full_digest=_unhex(row["full_digest"]), base_full_digest=_unhex(row["base_full_digest"]),
    )  # fmt: skip
