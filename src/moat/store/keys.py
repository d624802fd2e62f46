"""API keys of ``moat serve``: each belongs to one tenant; only a hash is ever stored.

Trust domain: host (server and CLI). A key is ``e2b_`` + 40 hex digits (160 random bits;
e2b 2.45 rejects other formats client-side). With that much entropy a plain SHA-256 is a
safe verifier (no dictionary to attack), and lookup by hash is constant work per request.
The key itself is shown once, by ``moat keys create``, and never stored or logged.
Revoked keys stay listed (with when) so an operator can tell what was cut off.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from moat.errors import InvalidArgumentError, NotFoundError
from moat.paths import state_dir
from moat.store.health import make_private

__all__ = ["KEY_PATTERN", "TENANT_PATTERN", "KeyInfo", "KeyStore", "keys_db"]

#: The one key format moat issues and accepts.
KEY_PATTERN = re.compile(r"e2b_[0-9a-f]{40}")
#: Tenant names: short, printable, safe to show in a table and a log.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_ID = re.compile(r"key-[0-9a-f]{8}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    created    REAL NOT NULL,
    revoked    REAL
);
"""


def keys_db() -> Path:
    """Where the keys live: ``<state dir>/keys.db`` (``MOAT_STATE_DIR`` moves it)."""
    return state_dir() / "keys.db"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """One key as listed: never the key itself."""

    key_id: str
    tenant: str
    created: float
    revoked: float | None


class KeyStore:
    """The key table in SQLite (WAL: the CLI writes while the server reads)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or keys_db()
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        make_private(self.path)  # hashes only, but nobody else's business

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, tenant: str) -> tuple[str, str]:
        """A new key for ``tenant``: (key id, key). The key is returned once, here."""
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidArgumentError(
                "tenant must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        key = "e2b_" + secrets.token_hex(20)
        key_id = "key-" + secrets.token_hex(4)
        self._db.execute(
            "INSERT INTO api_keys (key_id, tenant, key_sha256, created) VALUES (?, ?, ?, ?)",
            (key_id, tenant, _digest(key), time.time()),
        )
        return key_id, key

    def tenant_of(self, key: str | None) -> str | None:
        """The tenant of a valid, unrevoked key; None for anything else."""
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            return None
        row = self._db.execute(
            "SELECT tenant FROM api_keys WHERE key_sha256 = ? AND revoked IS NULL",
            (_digest(key),),
        ).fetchone()
        return None if row is None else str(row[0])

    def lookup(self, key: str | None) -> KeyInfo | None:
        """The listing of a valid, unrevoked key (its id and tenant); None for anything else."""
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            return None
        row = self._db.execute(
            "SELECT key_id, tenant, created FROM api_keys WHERE key_sha256 = ? AND revoked IS NULL",
            (_digest(key),),
        ).fetchone()
        return None if row is None else KeyInfo(str(row[0]), str(row[1]), float(row[2]), None)

    def is_live(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that is not revoked."""
        row = self._db.execute(
            "SELECT 1 FROM api_keys WHERE key_id = ? AND revoked IS NULL", (key_id,)
        ).fetchone()
        return row is not None

    def list(self) -> list[KeyInfo]:
        rows = self._db.execute(
            "SELECT key_id, tenant, created, revoked FROM api_keys ORDER BY created"
        ).fetchall()
        return [KeyInfo(str(r[0]), str(r[1]), float(r[2]), r[3]) for r in rows]

    def revoke(self, key_id: str) -> None:
        """Revoke by key id (as listed). NotFoundError if there is no such live key."""
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise InvalidArgumentError("a key id looks like key-0123abcd")
        cur = self._db.execute(
            "UPDATE api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL",
            (time.time(), key_id),
        )
        if cur.rowcount != 1:
            raise NotFoundError(f"no live key {key_id}")
