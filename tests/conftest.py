"""Shared fixtures: deterministic keys and images."""

from __future__ import annotations

import os
import shutil

import pytest

from otaproto.keys import Algorithm, SigningKey
from shoal.synthetic import evolve, firmware_like

__all__ = ["evolve", "firmware_like", "require_program", "skip_inside_readme_run"]

GOLDEN_SEED = bytes(range(32))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


#: Set by tests/test_demo.py for the test command it runs in a fresh clone.
INSIDE_README_RUN = bool(os.environ.get("SHOAL_README_TEST"))


def skip_inside_readme_run() -> None:
    """Skip a long test in the README test command's run in a fresh clone: the
    outer run, which started that one, runs it (the suite would run twice)."""
    if INSIDE_README_RUN:
        pytest.skip("long, and run by the test command that runs the README's")


def require_program(name: str) -> str:
    """The path of ``name``; skips the test on a laptop without it, fails under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install it, or run .ci/run)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def ed_key() -> SigningKey:
    return SigningKey.from_ed25519_seed(GOLDEN_SEED)


@pytest.fixture
def p256_key() -> SigningKey:
    return SigningKey.generate(Algorithm.P256)


@pytest.fixture
def other_key() -> SigningKey:
    return SigningKey.from_ed25519_seed(bytes(range(1, 33)))
