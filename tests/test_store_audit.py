"""The audit store under floods and hostile text (issue 17 §3): aggregation, the writer
thread, the per-sandbox rate limit, retention, and the sandbox's guard over its own text."""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError
from moat.guard import Guard, GuardPolicy
from moat.guard.policy import Mode
from moat.store import AuditLog, AuditSettings
from moat.store.text import inert

VALUE = "Sup3r-" + "Secr3tValue"


def _deny(log: AuditLog, sandbox_id: str, host: str, method: str = "GET") -> int | None:
    return log.record_egress(
        sandbox_id, method=method, host=host, port=80, resolved_ip=None, allowed=False,
        reason="not_allowed",
    )  # fmt: skip


def _rows(path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT kind, label, channel, count FROM events ORDER BY id").fetchall()
    finally:
        db.close()


def test_150k_findings_are_a_few_rows_written_off_thread(tmp_path: Path) -> None:
    writers: set[int] = set()
    with AuditLog(tmp_path / "a.db") as log:

        def trace(sql: str) -> None:
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                writers.add(threading.get_ident())

        log._db.set_trace_callback(trace)
        labels = ("DB_PASSWORD", "aws", "canary:github:abcd")
        started = time.monotonic()
        for i in range(150_000):
            log.record_finding("sbx-flood", labels[i % 3], "stdout", canary=i % 3 == 2)
        spent = time.monotonic() - started
        rows = log.query(sandbox_id="sbx-flood")
    assert writers and threading.get_ident() not in writers  # no write on the caller's thread
    assert len(rows) <= 3, rows  # O(labels), not O(findings)
    assert {r["label"]: r["count"] for r in rows} == {label: 50_000 for label in labels}
    assert spent < 5, spent  # recording is an in-memory count (~2 s on a loaded 2-core host)


def test_findings_aggregate_per_call(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        for _ in range(10):
            log.record_finding("s", "DB", "stdout")
        log.record_exec("s", "python", "ab" * 32, 3)  # ends the call
        for _ in range(4):
            log.record_finding("s", "DB", "stdout")
        log.record_finding("s", "DB", "stderr")
        rows = log.query(sandbox_id="s", kind="finding")
    assert sorted((r["channel"], r["count"]) for r in rows) == [
        ("stderr", 1), ("stdout", 4), ("stdout", 10)
    ]  # fmt: skip


def test_rate_limit_counts_what_it_drops(tmp_path: Path) -> None:
    settings = AuditSettings(rows_per_second=0.1, burst=5)
    with AuditLog(tmp_path / "a.db", settings) as log:
        log.record_sandbox("s", "created", "container")
        handles = [_deny(log, "s", f"h{i}.test") for i in range(50)]
        _deny(log, "other", "x.test")
        rows = log.query(sandbox_id="s")
        assert len(log.query(sandbox_id="other")) == 1  # the bucket is per sandbox
    assert handles.count(None) == 45
    assert len([r for r in rows if r["kind"] == "egress"]) == 5  # the burst
    dropped = [r for r in rows if r["kind"] == "audit_dropped"]
    assert len(dropped) == 1 and dropped[0]["count"] == 45  # one row says what was not written
    assert dropped[0]["label"] == "egress" and dropped[0]["reason"] == "rate_limited"
    assert [r for r in rows if r["kind"] == "sandbox"]  # lifecycle rows are never limited


def test_retention_by_age(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        log.record_sandbox("old", "created", "container")
    db = sqlite3.connect(path)
    db.execute("UPDATE events SET ts = ts - 10 * 86400")
    db.commit()
    db.close()
    with AuditLog(path, AuditSettings(retention_days=7)) as log:
        log.record_sandbox("new", "created", "container")
        assert log.prune()
        assert {r["sandbox_id"] for r in log.query()} == {"new"}
    with AuditLog(path, AuditSettings(retention_days=0)) as log:  # 0: no age bound
        assert log.prune() and len(log.query()) == 1


def test_retention_by_size(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    settings = AuditSettings(max_mb=0.25, rows_per_second=1e6, burst=10**6)
    with AuditLog(path, settings) as log:
        for i in range(6000):
            _deny(log, f"s{i % 50}", f"h{i}-" + "x" * 200 + ".test")
        assert log.prune()
        rows = log.query(limit=100_000)
    assert 0 < len(rows) < 6000
    assert rows[0]["host"].startswith("h5999-")  # the newest are kept, the oldest went
    db = sqlite3.connect(path)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    used = (
        db.execute("PRAGMA page_count").fetchone()[0]
        - db.execute("PRAGMA freelist_count").fetchone()[0]
    )
    db.close()
    assert used * page <= 0.25 * 1024 * 1024
    assert path.stat().st_size <= 0.4 * 1024 * 1024  # incremental vacuum gave pages back


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOAT_AUDIT_RETENTION_DAYS", "3.5")
    monkeypatch.setenv("MOAT_AUDIT_MAX_MB", "10")
    monkeypatch.setenv("MOAT_AUDIT_ROWS_PER_SECOND", "7")
    s = AuditSettings.from_env()
    assert (s.retention_days, s.max_mb, s.rows_per_second) == (3.5, 10, 7)
    for bad in ("-1", "nan", "lots", "1e400"):
        monkeypatch.setenv("MOAT_AUDIT_MAX_MB", bad)
        with pytest.raises(InvalidArgumentError):
            AuditSettings.from_env()


def test_rows_queued_at_exit_are_written(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    code = (
        "import sys\nfrom moat.store import AuditLog\nlog = AuditLog(sys.argv[1])\n"
        "for i in range(500):\n    log.record_exec('sbx-x', 'python', str(i), i)\n"
        "for i in range(1000):\n    log.record_finding('sbx-x', 'DB', 'stdout')\n"
    )  # no close(), no flush(): the interpreter exits with rows queued
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    rows = _rows(path)
    assert len([r for r in rows if r[0] == "exec"]) == 500
    assert sum(int(str(r[3] or 0)) for r in rows if r[0] == "finding") == 1000


def test_stored_text_is_escaped_and_bounded() -> None:
    assert inert("a\u202eb\u200bc\\x1b\x1b") == "a\\u202eb\\u200bc\\\\x1b\\x1b"
    assert inert("GET" * 100, "method") == "GET" * 21 + "…"
    assert len(inert("h" * 10_000, "host") or "") == 256
    assert inert("plain.example.com", "host") == "plain.example.com"


def test_the_sandboxs_guard_scrubs_its_text(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        guard = Guard(GuardPolicy(mode="block"), [(VALUE, "DB_PASSWORD")],
                      on_finding=lambda f: log.record_finding("sbx-g", f.label, f.channel,
                                                              canary=f.canary))  # fmt: skip
        canary = guard.canary("aws")
        log.set_scrubber("sbx-g", guard.scrub_text)
        # a host name is canonical (lower case) by the time it is audited
        host = f"{canary}.{VALUE}.evil.test".lower()
        log.record_egress("sbx-g", method=f"X{canary}", host=host, port=443,
                          resolved_ip=None, allowed=False, reason="not_allowed")  # fmt: skip
        log.record_exec("sbx-g", "python", "ab" * 32, 1, error_name=f"E{VALUE}")
        rows = log.query(sandbox_id="sbx-g")
        egress = next(r for r in rows if r["kind"] == "egress")
        assert egress["host"] == "[REDACTED:aws].[REDACTED:DB_PASSWORD].evil.test"
        assert egress["method"] == "X[REDACTED:aws]"
        findings = [r for r in rows if r["kind"] == "finding"]
        assert any(r["label"].startswith("canary:aws") and r["channel"] == "audit"
                   for r in findings)  # fmt: skip
        # the guard goes with its sandbox: no scrubber keeps it alive
        del guard
        gc.collect()
        _deny(log, "sbx-g", "after.test")
        assert log.query(sandbox_id="sbx-g")[0]["host"] == "after.test"
    for suffix in ("", "-wal"):
        f = Path(str(path) + suffix)
        if f.exists():
            data = f.read_bytes().lower()
            assert VALUE.lower().encode() not in data and canary.lower().encode() not in data


@pytest.mark.parametrize("mode", ["redact", "block", "off"])
def test_scrub_text_redacts_in_every_mode_and_folds_case(mode: Mode) -> None:
    seen: list[str] = []
    g = Guard(GuardPolicy(mode=mode), [(VALUE, "DB")], on_finding=lambda f: seen.append(f.label))
    assert g.scrub_text(f"x.{VALUE.lower()}.test", "audit") == "x.[REDACTED:DB].test"
    assert g.scrub_text(f"{VALUE}", "audit") == "[REDACTED:DB]"
    assert seen == ["DB", "DB"]  # one finding each: the folded match doesn't double count
    assert g.scrub_text("clean.example.test", "audit") == "clean.example.test"


def test_store_files_are_private_from_the_first_open(tmp_path: Path) -> None:
    """The database and the -wal/-shm SQLite made at first open are 0600, not the umask's
    0644 (stat only: opening the files here would drop the store's locks)."""
    from moat.store.keys import KeyStore

    old = os.umask(0o022)
    try:
        audit = AuditLog(tmp_path / "a.db")
        keys = KeyStore(tmp_path / "k.db")
        audit.record_exec("sbx-x", "python", "1", 0)
        assert audit.flush()
        for db in ("a.db", "k.db"):
            files = [p for p in tmp_path.iterdir() if p.name.startswith(db)]
            assert {p.name for p in files} >= {db, db + "-wal", db + "-shm"}  # control
            for p in files:
                assert p.stat().st_mode & 0o777 == 0o600, p.name
        keys.close()
        audit.close()
    finally:
        os.umask(old)
