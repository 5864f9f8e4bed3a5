"""Messages between gateways and the orchestrator over MQTT, and the operator API.

Rules (spec: ``docs/topics.md`` §Messages):

* Device traffic is CBOR: one map with text keys per message; the topic says
  what the message is. Unknown keys are refused, so both sides know exactly
  what the other meant; a new field means a new protocol version in the topic.
* Every command to a gateway carries the gateway's own command sequence number
  ``seq`` (1, 2, 3, ... per gateway, never reused). The gateway acknowledges
  each one, handles each at most once (it remembers the highest it handled),
  and the orchestrator re-sends what was not acknowledged. So lost, duplicated
  and late messages are all harmless.
* Status reports carry a per-deployment sequence number from the gateway; the
  orchestrator ignores anything not newer than what it recorded.
* Every size is bounded before decoding (:data:`MAX_MESSAGE_BYTES`, block
  size and count limits below).
* The operator API takes JSON (so ``mosquitto_pub -m '{...}'`` works) or CBOR
  (needed to upload an artifact's bytes); a reply uses the request's encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otaproto import cbor
from otaproto.errors import LimitExceeded, MalformedError

MAX_MESSAGE_BYTES = 64 * 1024  #: any device message except a block
MAX_BLOCK_BYTES = 64 * 1024  #: largest block the orchestrator serves
DEFAULT_BLOCK_BYTES = 16 * 1024
MAX_BLOCKS_PER_FETCH = 32  #: blocks one FETCH may ask for
MAX_OPERATOR_MESSAGE_BYTES = 17 * 1024 * 1024  #: an artifact upload fits
MAX_NODES_PER_GATEWAY = 256
DIGEST_BYTES = 32


# --- a tiny schema language: key -> (kind, required) -----------------------------

Schema = Mapping[str, tuple[str, bool]]


def _utf8_bytes(text: str) -> int:
    """The UTF-8 length of ``text``, or -1 when it cannot be UTF-8 (a lone surrogate from JSON)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return -1


_KINDS: dict[str, Callable[[Any], bool]] = {
    "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64,
    "text": lambda v: isinstance(v, str) and 0 < _utf8_bytes(v) <= 256,
    "longtext": lambda v: isinstance(v, str) and 0 <= _utf8_bytes(v) <= 4096,
    "bool": lambda v: isinstance(v, bool),
    "digest": lambda v: isinstance(v, bytes) and len(v) == DIGEST_BYTES,
    "bytes": lambda v: isinstance(v, bytes),
    "list": lambda v: isinstance(v, list),
    "map": lambda v: isinstance(v, dict),
}


def _check(value: Any, kind: str, where: str) -> Any:
    if not _KINDS[kind](value):
        raise MalformedError(where, f"must be {kind}")
    return value


def decode_map(
    data: bytes, schema: Schema, what: str, *, limit: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Decode a CBOR map and check it against ``schema``. Raises MalformedError, LimitExceeded."""
    if len(data) > limit:
        raise LimitExceeded(what, len(data), limit)
    raw = cbor.decode(data, what)
    return check_map(raw, schema, what)


def check_map(raw: Any, schema: Schema, what: str) -> dict[str, Any]:
    """Check an already decoded map against ``schema``. Raises MalformedError."""
    if not isinstance(raw, dict):
        raise MalformedError(what, "must be a map")
    for key in raw:
        if key not in schema:
            raise MalformedError(what, f"unknown key {key!r}")
    out: dict[str, Any] = {}
    for key, (kind, required) in schema.items():
        if key in raw and raw[key] is not None:
            out[key] = _check(raw[key], kind, f"{what}.{key}")
        elif required:
            raise MalformedError(what, f"missing {key}")
        else:
            out[key] = None
    return out


def encode_map(value: Mapping[str, Any]) -> bytes:
    """Deterministic CBOR of a message map, dropping None values."""
    return cbor.encode({k: v for k, v in value.items() if v is not None})


# --- gateway -> orchestrator ------------------------------------------------------

HELLO: Schema = {"agent": ("text", True), "nodes": ("list", True), "handled_seq": ("uint", True)}
STATE: Schema = {"online": ("bool", True)}
SLOT: Schema = {
    "version": ("text", True),
    "sequence": ("uint", True),
    "digest": ("digest", True),
    "size": ("uint", True),
}
NODE_REPORT: Schema = {
    "node": ("text", True),
    "device_type": ("text", False),
    "boot_state": ("text", False),
    "primary": ("map", False),
    "error": ("longtext", False),
}
INVENTORY: Schema = {"nodes": ("list", True)}
ACK: Schema = {"seq": ("uint", True)}
STATUS: Schema = {
    "deployment": ("text", True),
    "node": ("text", True),
    "seq": ("uint", True),
    "state": ("text", True),
    "bytes": ("uint", False),
    "total": ("uint", False),
    "reason": ("longtext", False),
    "mqtt_bytes": ("uint", False),
    "serial_bytes": ("uint", False),
}
FETCH: Schema = {"artifact": ("digest", True), "blocks": ("list", True)}

# --- orchestrator -> gateway ------------------------------------------------------

ARTIFACT_REF: Schema = {
    "digest": ("digest", True),  # SHA-256 of the artifact file: what FETCH names
    "size": ("uint", True),
    "block_bytes": ("uint", True),
    "kind": ("text", True),  # "full" or "bsdiff4"
    "base_digest": ("digest", False),  # delta: the node image it applies to
}
COMMAND: Schema = {
    "seq": ("uint", True),
    "type": ("text", True),  # "deploy" | "cancel"
    "deployment": ("text", True),
    "node": ("text", True),
    "artifact": ("map", False),  # deploy: what to fetch first
    "full": ("map", False),  # deploy of a delta: the full artifact, if the base is missing
}
BLOCK: Schema = {"artifact": ("digest", True), "index": ("uint", True), "data": ("bytes", True)}
ERROR: Schema = {"topic": ("text", True), "reason": ("longtext", True)}


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact a gateway is told to fetch, by the digest of its file."""

    digest: bytes
    size: int
    block_bytes: int
    kind: str
    base_digest: bytes | None = None

    def to_map(self) -> dict[str, Any]:
        return {k: v for k, v in {
            "digest": self.digest, "size": self.size, "block_bytes": self.block_bytes,
            "kind": self.kind, "base_digest": self.base_digest,
        }.items() if v is not None}  # fmt: skip

    @classmethod
    def from_map(cls, raw: Any, what: str) -> ArtifactRef:
        m = check_map(raw, ARTIFACT_REF, what)
        if m["kind"] not in ("full", "bsdiff4"):
            raise MalformedError(f"{what}.kind", "must be 'full' or 'bsdiff4'")
        if not 0 < m["block_bytes"] <= MAX_BLOCK_BYTES:
            raise MalformedError(f"{what}.block_bytes", f"must be 1..{MAX_BLOCK_BYTES}")
        return cls(m["digest"], m["size"], m["block_bytes"], m["kind"], m["base_digest"])

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_bytes)


def decode_fetch(data: bytes) -> tuple[bytes, list[int]]:
    """A FETCH: the artifact digest and the block indices. Raises MalformedError, LimitExceeded."""
    m = decode_map(data, FETCH, "fetch")
    blocks = m["blocks"]
    if not 0 < len(blocks) <= MAX_BLOCKS_PER_FETCH:
        raise MalformedError("fetch.blocks", f"must list 1..{MAX_BLOCKS_PER_FETCH} blocks")
    for index in blocks:
        _check(index, "uint", "fetch.blocks")
    return m["artifact"], list(blocks)


# --- operator API -------------------------------------------------------------------

REQUEST: Schema = {"id": ("text", True), "op": ("text", True), "args": ("map", False)}


@dataclass(frozen=True)
class OperatorRequest:
    """One operator request, and whether its reply goes back as JSON."""

    id: str
    op: str
    args: dict[str, Any]
    json: bool


def decode_request(data: bytes) -> OperatorRequest:
    """A JSON or CBOR operator request. Raises MalformedError, LimitExceeded."""
    if len(data) > MAX_OPERATOR_MESSAGE_BYTES:
        raise LimitExceeded("operator request", len(data), MAX_OPERATOR_MESSAGE_BYTES)
    is_json = data[:1] in (b"{", b" ", b"\n", b"\t")
    if is_json:
        if len(data) > MAX_MESSAGE_BYTES:
            raise LimitExceeded("JSON operator request", len(data), MAX_MESSAGE_BYTES)
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise MalformedError("operator request", f"not valid JSON ({exc})") from exc
    else:
        raw = cbor.decode(data, "operator request")
    m = check_map(raw, REQUEST, "operator request")
    return OperatorRequest(m["id"], m["op"], m["args"] or {}, is_json)


def encode_response(
    request_id: str, *, as_json: bool, result: Any = None, error: str | None = None
) -> bytes:
    """A reply to an operator request, in the request's encoding."""
    body: dict[str, Any] = {"id": request_id, "ok": error is None}
    if error is None:
        body["result"] = result
    else:
        body["error"] = error
    if as_json:
        return json.dumps(body, default=_json_default, sort_keys=True).encode()
    return cbor.encode(body)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def decode_response(data: bytes) -> dict[str, Any]:
    """A reply, JSON or CBOR (for the CLI). Raises MalformedError."""
    try:
        raw = json.loads(data) if data[:1] == b"{" else cbor.decode(data, "operator response")
    except ValueError as exc:
        raise MalformedError("operator response", "not valid JSON") from exc
    if not isinstance(raw, dict) or "id" not in raw or "ok" not in raw:
        raise MalformedError("operator response", "must be a map with id and ok")
    return raw
