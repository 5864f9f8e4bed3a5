"""One error family for all of Shoal, split by who is at fault.

Rules (after h11 and trio):

* :class:`UsageError` means *we* misused an API: a caller passed an argument
  that can never work, or asked a state machine for something illegal in its
  current state. It is a bug on our side of the wire.
* :class:`InvalidInput` means the bytes came from outside (a file, a peer, the
  broker) and are wrong: malformed, too large, badly signed, for another
  device. Decoders fed arbitrary bytes raise only this family.
* :class:`LinkError` means a transport went away: :class:`LinkClosed` when it
  was closed in an orderly way (by us or the peer), :class:`LinkBroken` when
  it failed from outside (port vanished, timeout, reset).

Third-party exceptions are wrapped where they enter, with ``raise ... from``,
so callers catch only these types. Every message is one line that names what
failed, fit to print as a CLI error.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""


class UsageError(ShoalError):
    """The caller misused an API (our bug, not the peer's)."""


class InvalidInput(ShoalError):
    """Data from outside is unacceptable; nothing was changed because of it."""


class MalformedError(InvalidInput):
    """Bytes that do not decode to the expected structure.

    ``field`` names the structure or field that failed (``"manifest.sequence"``).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"malformed {field}: {reason}")
        self.field = field
        self.reason = reason


class LimitExceeded(InvalidInput):
    """A size or count above the limit in :mod:`otaproto.limits`, caught before allocation."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes, over the limit of {limit}")
        self.what = what
        self.size = size
        self.limit = limit


class KeyFormatError(InvalidInput):
    """A key file that is not a usable Ed25519 or ECDSA P-256 key."""


class VerificationError(InvalidInput):
    """A well-formed artifact that must not be trusted."""


class UnknownKeyError(VerificationError):
    """Signed by a key id that is not among the trusted keys."""


class SignatureError(VerificationError):
    """The signature does not verify with the trusted key of that key id."""


class DigestMismatch(VerificationError):
    """A SHA-256 digest differs from the signed one (payload or rebuilt image)."""


class BaseMismatch(VerificationError):
    """A delta was offered an image that is not its signed base."""


class DeviceTypeMismatch(VerificationError):
    """The artifact is not for this device type."""


class RollbackRefused(VerificationError):
    """The artifact's sequence number is not newer than the installed one."""


class DeltaError(InvalidInput):
    """A bsdiff4 patch that is corrupt or would write outside the signed image size."""


class ImageFormatError(InvalidInput):
    """A firmware image file that cannot be read (bad Intel HEX record, ...)."""


class LinkError(ShoalError):
    """A transport stopped carrying bytes."""


class LinkClosed(LinkError):
    """The link was closed in an orderly way."""


class LinkBroken(LinkError):
    """The link failed from outside: port vanished, timeout, reset."""
