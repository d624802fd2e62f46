"""Named secrets of ``moat serve``'s tenants: values written once, used by name, never read back.

Trust domain: host (server). A stored secret is what the create body's brokered secret is
(a value bound to hosts, placed into one request header by the egress gateway; invariant 3),
kept under a name so that an agent's create call can name it instead of carrying the value.

Values are sealed with AES-256-GCM under a key of this state directory
(``<state>/secrets.key``, mode 0600, made on first use), with the tenant and the secret's id as
associated data: a copy of ``secrets.db`` alone reveals nothing, and a row moved to another
tenant or id fails to open. Nothing here ever returns a value to a caller but
:meth:`SecretStore.resolve`, which the server calls to hand values to the engine at create.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moat.errors import InvalidArgumentError, NotFoundError, QuotaExceededError, SandboxError
from moat.paths import state_dir
from moat.store.health import make_private

__all__ = ["MAX_PER_TENANT", "SECRET_ID", "SECRET_NAME", "SecretInfo", "SecretStore"]

#: A secret's name is the environment variable the sandbox sees its placeholder under.
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
SECRET_ID = re.compile(r"sec-[0-9a-f]{16}")
#: Per tenant: a bound on rows a key holder can make (one tenant never fills the disk).
MAX_PER_TENANT = 1000
_MAX_METADATA = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    secret_id TEXT PRIMARY KEY,
    tenant    TEXT NOT NULL,
    name      TEXT NOT NULL,
    sealed    BLOB NOT NULL,
    binding   TEXT NOT NULL,
    metadata  TEXT NOT NULL,
    version   INTEGER NOT NULL,
    created   REAL NOT NULL,
    updated   REAL NOT NULL,
    UNIQUE (tenant, name)
);
"""


@dataclass(frozen=True)
class SecretInfo:
    """A stored secret as listed: everything but its value."""

    secret_id: str
    name: str
    hosts: tuple[str, ...]
    header: str | None
    template: str
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = 1
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class Binding:
    """Where a secret may be used (checked by the caller with the gateway's own rules)."""

    hosts: tuple[str, ...]
    header: str | None = "Authorization"
    template: str = "{value}"


def secrets_db() -> Path:
    return state_dir() / "secrets.db"


def _key(path: Path) -> bytes:
    """This state directory's sealing key, made once (O_EXCL: two first starts agree)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != 32:
            raise SandboxError("the secrets key file is damaged; refusing to use it") from None
        return data
    key = AESGCM.generate_key(bit_length=256)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _metadata(meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise InvalidArgumentError("secret metadata must map strings to strings")
    if len(json.dumps(meta)) > _MAX_METADATA:
        raise InvalidArgumentError(f"secret metadata is over {_MAX_METADATA} bytes")
    return dict(meta)


class SecretStore:
    """The secrets table in SQLite (WAL), values sealed (see the module's docstring)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or secrets_db()
        self._aead = AESGCM(_key(self.path.with_name("secrets.key")))
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        make_private(self.path)

    def close(self) -> None:
        self._db.close()

    def _seal(self, tenant: str, secret_id: str, value: str) -> bytes:
        nonce = secrets.token_bytes(12)
        aad = f"{tenant}\0{secret_id}".encode()
        return nonce + self._aead.encrypt(nonce, value.encode("utf-8"), aad)

    def _open(self, tenant: str, secret_id: str, sealed: bytes) -> str:
        aad = f"{tenant}\0{secret_id}".encode()
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], aad).decode("utf-8")
        except (InvalidTag, ValueError):
            raise SandboxError("a stored secret could not be opened (damaged store)") from None

    def create(
        self, tenant: str, name: str, value: str, binding: Binding, metadata: object = None
    ) -> SecretInfo:
        """Store a new secret; InvalidArgumentError if ``name`` is taken by this tenant."""
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            raise InvalidArgumentError(
                "secret name must be an environment variable name (letters, digits, '_')"
            )
        meta = _metadata(metadata)
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM secrets WHERE tenant = ?", (tenant,)
        ).fetchone()
        if count >= MAX_PER_TENANT:
            raise QuotaExceededError(f"at most {MAX_PER_TENANT} secrets per tenant")
        sid = "sec-" + secrets.token_hex(8)
        now = time.time()
        try:
            self._db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                (sid, tenant, name, self._seal(tenant, sid, value), _dump(binding),
                 json.dumps(meta), now, now),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise InvalidArgumentError(f"a secret named {name} exists already") from None
        return self.get(tenant, sid)

    def update(
        self,
        tenant: str,
        secret_id: str,
        value: str | None = None,
        binding: Binding | None = None,
        metadata: object = None,
    ) -> SecretInfo:
        """A new version: the value, binding and/or metadata given replace the old ones."""
        old = self.get(tenant, secret_id)
        sealed = None if value is None else self._seal(tenant, old.secret_id, value)
        bound = None if binding is None else _dump(binding)
        meta = None if metadata is None else json.dumps(_metadata(metadata))
        self._db.execute(
            "UPDATE secrets SET version = version + 1, updated = ?, sealed = COALESCE(?, sealed),"
            " binding = COALESCE(?, binding), metadata = COALESCE(?, metadata)"
            " WHERE tenant = ? AND secret_id = ?",
            (time.time(), sealed, bound, meta, tenant, old.secret_id),
        )
        return self.get(tenant, old.secret_id)

    def get(self, tenant: str, secret_id: str) -> SecretInfo:
        """One of ``tenant``'s secrets; another tenant's id is NotFoundError like an unknown one."""
        row = None
        if isinstance(secret_id, str) and SECRET_ID.fullmatch(secret_id):
            row = self._db.execute(
                "SELECT secret_id, name, binding, metadata, version, created, updated "
                "FROM secrets WHERE tenant = ? AND secret_id = ?",
                (tenant, secret_id),
            ).fetchone()
        if row is None:
            raise NotFoundError("secret was not found")
        return _info(row)

    def list_secrets(self, tenant: str) -> list[SecretInfo]:
        rows = self._db.execute(
            "SELECT secret_id, name, binding, metadata, version, created, updated "
            "FROM secrets WHERE tenant = ? ORDER BY name",
            (tenant,),
        ).fetchall()
        return [_info(r) for r in rows]

    def delete(self, tenant: str, secret_id: str) -> None:
        info = self.get(tenant, secret_id)
        self._db.execute(
            "DELETE FROM secrets WHERE tenant = ? AND secret_id = ?", (tenant, info.secret_id)
        )

    def resolve(self, tenant: str, names: list[str]) -> dict[str, tuple[str, Binding]]:
        """The values and bindings of ``tenant``'s secrets called ``names`` (for the engine
        at create only); NotFoundError names the first one missing."""
        out: dict[str, tuple[str, Binding]] = {}
        for name in names:
            row = self._db.execute(
                "SELECT secret_id, sealed, binding FROM secrets WHERE tenant = ? AND name = ?",
                (tenant, name),
            ).fetchone()
            if row is None:
                shown = name if SECRET_NAME.fullmatch(name) else "(bad name)"
                raise NotFoundError(f"no stored secret named {shown}")
            out[name] = (self._open(tenant, row[0], bytes(row[1])), _load(row[2]))
        return out


def _dump(b: Binding) -> str:
    return json.dumps({"hosts": list(b.hosts), "header": b.header, "template": b.template})


def _load(raw: str) -> Binding:
    d = json.loads(raw)
    return Binding(tuple(d["hosts"]), d["header"], d["template"])


def _info(row: tuple[object, ...]) -> SecretInfo:
    b = _load(str(row[2]))
    return SecretInfo(
        secret_id=str(row[0]),
        name=str(row[1]),
        hosts=b.hosts,
        header=b.header,
        template=b.template,
        metadata=json.loads(str(row[3])),
        version=int(row[4]),  # type: ignore[call-overload]
        created=float(row[5]),  # type: ignore[arg-type]
        updated=float(row[6]),  # type: ignore[arg-type]
    )
