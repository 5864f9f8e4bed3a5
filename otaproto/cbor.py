"""Strict CBOR in and deterministic CBOR out.

Every CBOR structure Shoal signs or parses goes through these two functions:

* :func:`encode` writes the deterministic encoding (RFC 8949 §4.2.1: shortest
  forms, definite lengths, map keys sorted by their encoded bytes), so that a
  signature covers exactly one byte string for one value.
* :func:`decode` reads exactly one data item, rejecting trailing bytes,
  indefinite lengths, duplicate map keys and nesting deeper than the limit;
  any failure becomes :class:`~otaproto.errors.MalformedError` naming ``what``.
* :func:`decode_deterministic` additionally demands that the input *was* the
  deterministic encoding, for structures that are signed.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from otaproto.errors import MalformedError
from otaproto.limits import DEFAULT_LIMITS


def encode(value: object) -> bytes:
    """Deterministic CBOR encoding of ``value``."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, what: str, *, max_depth: int = DEFAULT_LIMITS.max_cbor_depth) -> Any:
    """Decode exactly one CBOR item from ``data``.

    The caller has already bounded ``len(data)``. Raises MalformedError (with
    ``what`` as the field name) for anything that is not one well-formed item.
    """
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream, max_depth=max_depth, allow_indefinite=False, allow_duplicate_keys=False
        )
        value = decoder.decode()
    except cbor2.CBORDecodeEOF as exc:
        raise MalformedError(what, "truncated: the data ends inside a CBOR item") from exc
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedError(what, f"not valid CBOR ({_first_line(exc)})") from exc
    if stream.tell() != len(data):
        raise MalformedError(
            what, f"{len(data) - stream.tell()} trailing bytes after the CBOR item"
        )
    return value


def decode_deterministic(
    data: bytes, what: str, *, max_depth: int = DEFAULT_LIMITS.max_cbor_depth
) -> Any:
    """Decode like :func:`decode`, then require the deterministic encoding.

    Signed structures must have exactly one encoding, else two artifacts with
    different bytes could carry the same meaning (or a verifier and a node could
    disagree about it). Raises MalformedError.
    """
    value = decode(data, what, max_depth=max_depth)
    try:
        again = encode(value)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        raise MalformedError(what, f"holds a value Shoal cannot use ({_first_line(exc)})") from exc
    if again != data:
        raise MalformedError(what, "not in deterministic CBOR encoding (RFC 8949 §4.2.1)")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:120]
