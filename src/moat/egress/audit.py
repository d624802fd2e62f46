"""The audit trail: one row per egress decision, code execution and guard finding.

Trust domain: host engine. Rows are written by the gateway, engine and guard; their text
fields come partly from the sandbox (host names are canonical by then, the rest is capped
and stripped of control characters). No secret value is ever passed here: egress rows carry
the secret's *handle* (its environment variable name) only (DESIGN invariant 3).

Storage: one SQLite file in WAL mode (readers never block the writer), by default
``<state dir>/audit.db``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from moat.errors import InvalidArgumentError
from moat.paths import audit_db

__all__ = ["AuditLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    method TEXT, host TEXT, port INTEGER, resolved_ip TEXT,
    result TEXT, reason TEXT,
    bytes_up INTEGER, bytes_down INTEGER, secret TEXT,
    language TEXT, code_sha256 TEXT, duration_ms INTEGER, error_name TEXT,
    label TEXT, channel TEXT, canary TEXT, tier TEXT
);
CREATE INDEX IF NOT EXISTS events_sandbox ON events (sandbox_id, id);
"""
_COLUMNS = (
    "id", "ts", "kind", "sandbox_id", "method", "host", "port", "resolved_ip", "result",
    "reason", "bytes_up", "bytes_down", "secret", "language", "code_sha256", "duration_ms",
    "error_name", "label", "channel", "canary", "tier",
)  # fmt: skip
_KINDS = frozenset({"egress", "exec", "finding", "sandbox"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 512


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub("?", text)[:_MAX_TEXT]


def _int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError("audit counters must be integers")
    return max(0, min(value, 1 << 62))


class AuditLog:
    """An append-only audit store; thread-safe, usable from any event loop."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else audit_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "tier" not in columns:  # a store written before the column existed
            self._db.execute("ALTER TABLE events ADD COLUMN tier TEXT")
        self._path_mode()

    def _path_mode(self) -> None:
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    def _insert(self, row: dict[str, Any]) -> int:
        row.setdefault("ts", time.time())
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            cur = self._db.execute(
                f"INSERT INTO events ({cols}) VALUES ({marks})",  # noqa: S608 - our column names
                tuple(row.values()),
            )
            return int(cur.lastrowid or 0)

    def record_egress(
        self,
        sandbox_id: str,
        *,
        method: str | None,
        host: str | None,
        port: int | None,
        resolved_ip: str | None,
        allowed: bool,
        reason: str,
        bytes_up: int = 0,
        bytes_down: int = 0,
        secret: str | None = None,
    ) -> int:
        """One egress decision; returns its row id (see :meth:`update_egress`)."""
        return self._insert(
            {
                "kind": "egress",
                "sandbox_id": _text(sandbox_id),
                "method": _text(method),
                "host": _text(host),
                "port": _int(port),
                "resolved_ip": _text(resolved_ip),
                "result": "allow" if allowed else "deny",
                "reason": _text(reason),
                "bytes_up": _int(bytes_up),
                "bytes_down": _int(bytes_down),
                "secret": _text(secret),
            }
        )

    def update_egress(
        self, row_id: int, *, reason: str, bytes_up: int, bytes_down: int, secret: str | None = None
    ) -> None:
        """Complete an allowed decision's row when its tunnel ends (bytes moved, end reason)."""
        with self._lock:
            self._db.execute(
                "UPDATE events SET reason = ?, bytes_up = ?, bytes_down = ?,"
                " secret = COALESCE(?, secret) WHERE id = ? AND kind = 'egress'",
                (_text(reason), _int(bytes_up), _int(bytes_down), _text(secret), row_id),
            )

    def record_exec(
        self,
        sandbox_id: str,
        language: str,
        code_sha256: str,
        duration_ms: int,
        error_name: str | None = None,
    ) -> None:
        """One code execution (the code's hash, never the code)."""
        self._insert(
            {
                "kind": "exec",
                "sandbox_id": _text(sandbox_id),
                "language": _text(language),
                "code_sha256": _text(code_sha256),
                "duration_ms": _int(duration_ms),
                "error_name": _text(error_name),
                "result": "error" if error_name else "ok",
            }
        )

    def record_sandbox(
        self, sandbox_id: str, event: str, tier: str, reason: str | None = None
    ) -> None:
        """A sandbox's life: ``created`` / ``ended`` on the tier actually used."""
        self._insert(
            {
                "kind": "sandbox",
                "sandbox_id": _text(sandbox_id),
                "result": _text(event),
                "tier": _text(tier),
                "reason": _text(reason),
            }
        )

    def record_finding(
        self, sandbox_id: str, label: str, channel: str, canary: str | bool | None = None
    ) -> None:
        """One guard finding (label and channel; never the matched content)."""
        self._insert(
            {
                "kind": "finding",
                "sandbox_id": _text(sandbox_id),
                "label": _text(label),
                "channel": _text(channel),
                "canary": _text(canary) if canary not in (None, False) else None,
            }
        )

    def query(
        self,
        sandbox_id: str | None = None,
        denied_only: bool = False,
        kind: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Rows, newest first, as dicts with None-valued columns left out."""
        if kind is not None and kind not in _KINDS:
            raise InvalidArgumentError("audit kind must be egress, exec, finding or sandbox")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidArgumentError("audit limit must be between 1 and 100000")
        where: list[str] = []
        args: list[Any] = []
        if sandbox_id is not None:
            where.append("sandbox_id = ?")
            args.append(sandbox_id)
        if denied_only:
            where.append("result = 'deny'")
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        # columns are fixed and named (a store migrated by ALTER has them in another order)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"  # noqa: S608 - our column names
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{k: v for k, v in zip(_COLUMNS, r, strict=True) if v is not None} for r in rows]

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
