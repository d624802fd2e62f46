"""``moat keys``: keys are shown once, stored only as hashes, scoped to a tenant, revocable."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError, NotFoundError
from moat.store.keys import KEY_PATTERN, KeyStore


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOAT_STATE_DIR": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "moat.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_create_list_revoke_through_the_cli(tmp_path: Path) -> None:
    made = cli(tmp_path, "keys", "create", "--tenant", "alice")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key)
    # Stored hashed: the key is nowhere in the database files.
    for f in tmp_path.iterdir():
        assert key.encode() not in f.read_bytes()
        assert key[4:].encode() not in f.read_bytes()
    assert (tmp_path / "keys.db").stat().st_mode & 0o077 == 0
    listed = cli(tmp_path, "keys", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and key not in listed.stdout
    key_id = listed.stdout.split()[0]
    with KeyStore(tmp_path / "keys.db") as store:
        assert store.tenant_of(key) == "alice"
    revoked = cli(tmp_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    with KeyStore(tmp_path / "keys.db") as store:
        assert store.tenant_of(key) is None
    assert "revoked" in cli(tmp_path, "keys", "list").stdout
    again = cli(tmp_path, "keys", "revoke", key_id)
    assert again.returncode == 1 and "no live key" in again.stderr


def test_bad_tenant_names_and_key_shapes(tmp_path: Path) -> None:
    bad = cli(tmp_path, "keys", "create", "--tenant", "a b")
    assert bad.returncode != 0 and "e2b_" not in bad.stdout
    with KeyStore(tmp_path / "keys.db") as store:
        for name in ("", "-x", "a" * 65, "a/b", "a\nb"):
            with pytest.raises(InvalidArgumentError):
                store.create(name)
        _, key = store.create("bob")
        for wrong in (None, "", key.upper(), key + "0", key[:-1], "e2b_" + "0" * 40, 42):
            assert store.tenant_of(wrong) is None  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            store.revoke("key-'; DROP TABLE api_keys; --")
        with pytest.raises(NotFoundError):
            store.revoke("key-00000000")
        assert store.tenant_of(key) == "bob"


def test_tenants_do_not_share_keys(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as store:
        _, ka = store.create("alice")
        _, kb = store.create("bob")
        assert (store.tenant_of(ka), store.tenant_of(kb)) == ("alice", "bob")
    rows = sqlite3.connect(tmp_path / "keys.db").execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 2 and all(ka not in map(str, r) and kb not in map(str, r) for r in rows)
