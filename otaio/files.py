"""Files in and out, bounded on the way in and atomic on the way out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from otaproto.errors import InvalidInput, LimitExceeded


def read_bounded(path: Path, limit_bytes: int, what: str) -> bytes:
    """The bytes of ``path``, refusing before reading when it is over the limit.

    Raises LimitExceeded, or InvalidInput when the file cannot be read.
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit_bytes:
                raise LimitExceeded(f"{what} {path}", size, limit_bytes)
            data = handle.read(limit_bytes + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit_bytes:
        raise LimitExceeded(f"{what} {path}", len(data), limit_bytes)
    return data


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    The file is created with ``mode`` from the start (a private key is never
    world-readable, not even for a moment). Raises InvalidInput on failure.
    """
    path = path.resolve()
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc
