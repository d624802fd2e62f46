"""The audit trail records the tenant of every sandbox row (issue 16, invariant 11), and a
store written before the column existed opens and gains it (additive migration)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.tenants import TenantPolicies
from moat.store import AuditLog
from moat.testing.fake import FakeRuntime

_OLD_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    sandbox_id TEXT NOT NULL, method TEXT, host TEXT, port INTEGER, resolved_ip TEXT,
    result TEXT, reason TEXT, bytes_up INTEGER, bytes_down INTEGER, secret TEXT,
    language TEXT, code_sha256 TEXT, duration_ms INTEGER, error_name TEXT,
    label TEXT, channel TEXT, canary TEXT
);
"""


def test_every_row_of_a_sandbox_names_its_tenant(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        log.record_sandbox("sbx-a", "created", "container", tenant="acme")
        log.record_egress(
            "sbx-a", method="GET", host="x.example", port=443, resolved_ip=None,
            allowed=False, reason="not_allowed",
        )  # fmt: skip
        log.record_exec("sbx-a", language="python", code_sha256="0" * 64, duration_ms=1)
        log.record_finding("sbx-a", "aws", "stdout")
        log.record_sandbox("sbx-a", "ended", "container", "killed")
        log.record_egress(  # after its end: no tenant is guessed
            "sbx-a", method="GET", host="late.example", port=443, resolved_ip=None,
            allowed=False, reason="not_allowed",
        )  # fmt: skip
        log.record_sandbox("sbx-b", "created", "container", tenant="other")
        rows = log.query(sandbox_id="sbx-a")
        mine = log.query(tenant="acme")
    tagged = [r for r in rows if r.get("host") != "late.example"]
    assert len(tagged) == 5 and all(r["tenant"] == "acme" for r in tagged), rows
    assert {r["sandbox_id"] for r in mine} == {"sbx-a"} and len(mine) == 5


def test_a_store_without_the_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.execute(
        "INSERT INTO events (ts, kind, sandbox_id, result) VALUES (?, 'sandbox', 'sbx-old', "
        "'created')",
        (time.time(),),
    )
    db.commit()
    db.close()
    with AuditLog(path) as log:
        log.record_sandbox("sbx-new", "created", "gvisor", tenant="t1")
        rows = log.query()
    by_id = {r["sandbox_id"]: r for r in rows}
    assert "tenant" not in by_id["sbx-old"]  # old rows keep what they had
    assert by_id["sbx-new"]["tenant"] == "t1"


@pytest.mark.asyncio
async def test_the_front_door_records_the_callers_tenant(tmp_path: Path) -> None:
    engine = Engine(pool={}, runtime=FakeRuntime(unsafe_no_isolation=True))
    engine._audit = AuditLog(tmp_path / "f.db")
    door = FrontDoor(engine, TenantPolicies())
    info = await door.create("tenant-x", FrontDoor.resolve(isolation="container"))
    await door.kill("tenant-x", info.sandbox_id)
    rows = await door.audit("tenant-x", info.sandbox_id)
    life = [r for r in rows if r["kind"] == "sandbox"]
    assert {r["result"] for r in life} == {"created", "ended"}
    assert all(r["tenant"] == "tenant-x" for r in life), life
    engine._audit.close()
