"""The audit log: every operator request, who made it, when, and how it ended.

Rules (spec: ``docs/rollouts.md`` §Audit log):

* Every request an operator sends is one row: time, operator, role (as
  checked), op, a summary of its arguments, and the outcome (ok, or the
  error reply's text). Refused requests are recorded too (a viewer trying
  to start a rollout is exactly what an audit is for), and so are requests
  that could not even be read (op ``?``).
* A successful request's row is written in the same transaction as what the
  request changed: there is no change without its row. A refusal's row is
  written after the rollback, on its own.
* The summary never holds secrets or bulk bytes: byte strings become their
  length and SHA-256, keys that look like secrets are masked, long lists and
  strings are cut, and the whole summary is at most :data:`MAX_ARGS_CHARS`.
* The log keeps the newest :data:`MAX_ROWS` rows; older ones are dropped as
  new ones arrive, so its size is bounded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from sqlite_utils import Database

from otaproto.topics import ID_PATTERN

MAX_ROWS = 100_000
MAX_ARGS_CHARS = 1000
MAX_ERROR_CHARS = 1000
#: Most rows one ``audit.list`` returns.
MAX_LISTED = 1000
DEFAULT_LISTED = 100
_MAX_LIST_ITEMS = 20
_MAX_TEXT_CHARS = 200
_SECRET_WORDS = ("secret", "password", "token", "key")


def summarize(args: Any, depth: int = 0) -> Any:
    """``args`` made safe and short for the log (see the module rules)."""
    if isinstance(args, bytes | bytearray):
        return {"bytes": len(args), "sha256": hashlib.sha256(args).hexdigest()}
    if isinstance(args, str):
        return args if len(args) <= _MAX_TEXT_CHARS else args[:_MAX_TEXT_CHARS] + "..."
    if depth >= 4:
        return "..."
    if isinstance(args, dict):
        out: dict[str, Any] = {}
        for key, value in list(args.items())[:_MAX_LIST_ITEMS]:
            name = str(key)[:64]
            secret = any(word in name.lower() for word in _SECRET_WORDS)
            out[name] = "***" if secret else summarize(value, depth + 1)
        return out
    if isinstance(args, list | tuple):
        items = [summarize(v, depth + 1) for v in args[:_MAX_LIST_ITEMS]]
        if len(args) > _MAX_LIST_ITEMS:
            items.append(f"... ({len(args) - _MAX_LIST_ITEMS} more)")
        return items
    if args is None or isinstance(args, bool | int | float):
        return args
    return repr(args)[:_MAX_TEXT_CHARS]


def _clean(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters and made storable (no lone surrogates)."""
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


def _summary_text(args: Any) -> str:
    text = json.dumps(summarize(args), sort_keys=True, default=str)
    return text if len(text) <= MAX_ARGS_CHARS else json.dumps(text[:MAX_ARGS_CHARS] + "...")


class AuditLog:
    """The ``audit`` table. The caller holds the transaction; not thread-safe."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def record(
        self, operator: str, role: str | None, op: str, args: Any, error: str | None
    ) -> None:
        """One request: ``error`` None for success, else the error reply's text."""
        self._db.execute(
            "INSERT INTO audit (at, operator, role, op, args, ok, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                self._clock(), _clean(operator, 64), role, _clean(op, 64) or "?",
                _summary_text(args), int(error is None),
                None if error is None else _clean(error, MAX_ERROR_CHARS),
            ],
        )  # fmt: skip
        newest = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
        self._db.execute("DELETE FROM audit WHERE id <= ?", [int(newest) - MAX_ROWS])

    def entries(
        self, limit: int | None = None, operator: str | None = None, op: str | None = None
    ) -> dict[str, Any]:
        """The newest entries first, at most ``limit`` (default DEFAULT_LISTED, at most
        MAX_LISTED), of one operator and of ops starting with ``op`` if given."""
        count = DEFAULT_LISTED if limit is None else max(1, min(limit, MAX_LISTED))
        who = operator if operator is not None and ID_PATTERN.match(operator) else None
        if operator is not None and who is None:
            return {"entries": []}
        prefix = None if op is None else op[:64].replace("\\", "\\\\").replace("%", "\\%")
        prefix = None if prefix is None else prefix.replace("_", "\\_") + "%"
        rows = self._db.query(
            "SELECT * FROM audit WHERE (:who IS NULL OR operator = :who)"
            " AND (:op IS NULL OR op LIKE :op ESCAPE '\\') ORDER BY id DESC LIMIT :n",
            {"who": who, "op": prefix, "n": count},
        )
        return {
            "entries": [
                {
                    "id": r["id"],
                    "at": r["at"],
                    "operator": r["operator"],
                    "role": r["role"],
                    "op": r["op"],
                    "args": json.loads(r["args"]),
                    "ok": bool(r["ok"]),
                    "error": r["error"],
                }
                for r in rows
            ]
        }
