"""Account secrets, hashed in mosquitto's own format so one registry serves both brokers.

Rules:

* A stored secret is ``$7$<iterations>$<salt b64>$<hash b64>``: PBKDF2 with
  HMAC-SHA512, a 12-byte random salt, a 64-byte result, standard base64. This
  is the format ``mosquitto_passwd`` writes (mosquitto 2.x), so the password
  file of ``shoal broker mosquitto-config`` is the registry's column as is.
* The embedded broker verifies the same strings, in constant time.
* Tokens handed to gateways are 32 random bytes, URL-safe base64: long enough
  that the low iteration count mosquitto uses by default is not the weak point.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from otaproto.errors import MalformedError

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12
HASH_BYTES = 64
TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh random secret for a gateway or an operator."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_secret(secret: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The mosquitto ``$7$`` string for ``secret``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations, HASH_BYTES)
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"$7${iterations}${salt_b64}${digest_b64}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches the stored ``$7$`` string. Raises MalformedError if bad."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
        raise MalformedError("stored secret", "not a mosquitto $7$ hash")
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000:
        raise MalformedError("stored secret", f"iteration count {iterations} out of range")
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError as exc:
        raise MalformedError("stored secret", "bad base64") from exc
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)
