"""State hooks for tests: real shell scripts in a hooks folder, as an operator writes them."""

from __future__ import annotations

from pathlib import Path


def write_hook(folder: Path, name: str, body: str, *, executable: bool = True) -> Path:
    """A shell script hook named ``name`` in ``folder``; ``body`` runs under ``set -u``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\nset -u\n{body}\n")
    path.chmod(0o755 if executable else 0o644)
    return path
