"""Shared fixtures: deterministic keys and images."""

from __future__ import annotations

import os
import shutil

import pytest

from otaproto.keys import Algorithm, SigningKey
from shoal.synthetic import evolve, firmware_like

__all__ = ["evolve", "firmware_like", "require_program"]

GOLDEN_SEED = bytes(range(32))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


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
