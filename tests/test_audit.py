"""The SQLite audit trail."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError
from moat.store import AuditLog


def test_wal_and_query(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        log.record_egress("sbx-1", method="CONNECT", host="pypi.org", port=443,
                          resolved_ip="151.101.0.223", allowed=True, reason="allowed_by_rule",
                          bytes_up=10, bytes_down=2000)  # fmt: skip
        log.record_egress("sbx-1", method="GET", host="evil.test", port=80, resolved_ip=None,
                          allowed=False, reason="not_allowed")  # fmt: skip
        log.record_egress("sbx-2", method="CONNECT", host="x.test", port=443, resolved_ip=None,
                          allowed=False, reason="secret_exfiltration",
                          secret="OPENAI_API_KEY")  # fmt: skip
        log.record_exec("sbx-1", "python", "ab" * 32, 12, None)
        log.record_exec("sbx-1", "python", "cd" * 32, 40, "ZeroDivisionError")
        log.record_finding("sbx-1", "aws_key", "stdout", "canary-7")
        rows = log.query()
        assert len(rows) == 6 and rows[0]["kind"] == "finding"  # newest first
        assert [r["reason"] for r in log.query(sandbox_id="sbx-1", denied_only=True)] == [
            "not_allowed"
        ]
        assert log.query(sandbox_id="sbx-2")[0]["secret"] == "OPENAI_API_KEY"
        execs = log.query(kind="exec")
        assert [e["error_name"] for e in execs if "error_name" in e] == ["ZeroDivisionError"]
        assert execs[1]["duration_ms"] == 12 and execs[1]["result"] == "ok"
        assert log.query(limit=2)[1]["kind"] == "exec"
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert db.stat().st_mode & 0o077 == 0


def test_bad_queries_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        with pytest.raises(InvalidArgumentError):
            log.query(kind="egress; DROP TABLE events")
        with pytest.raises(InvalidArgumentError):
            log.query(limit=0)
        with pytest.raises(InvalidArgumentError):
            log.record_egress("s", method=None, host=None, port=None, resolved_ip=None,
                              allowed=False, reason="x", bytes_up="1")  # type: ignore[arg-type]  # fmt: skip


def test_hostile_text_is_stored_inert(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        log.record_finding("s'); DROP TABLE events;--", "l\x1b[31m\nx" * 200, "stdout")
        row = log.query()[0]
        assert "\x1b" not in row["label"] and "\n" not in row["label"]
        assert len(row["label"]) <= 512
        assert row["sandbox_id"].startswith("s');")


def test_concurrent_writers(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    other = AuditLog(tmp_path / "a.db")  # a second process-like handle on the same file

    def work(al: AuditLog, n: int) -> None:
        for i in range(n):
            al.record_exec("s", "python", str(i), i)

    threads = [threading.Thread(target=work, args=(al, 100)) for al in (log, other, log)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # Each handle writes from its own writer thread: a read flushes its own handle only.
    assert other.flush()
    assert len(log.query(limit=1000)) == 300
    log.close()
    other.close()


_WRITER = r"""
import sys
from moat.store.audit import AuditLog
log = AuditLog(sys.argv[1])
i = 0
while True:
    rid = log.record_egress("sbx-w", method="GET", host="example.com", port=443,
                            resolved_ip="192.0.2.1", allowed=True, reason="ok")
    log.update_egress(rid, reason="closed", bytes_up=1, bytes_down=2)
    log.record_exec("sbx-w", "python", "ab" * 32, 5)
    if i % 50 == 0:
        log.query(limit=10)
    i += 1
"""


def test_writers_killed_mid_write_leave_a_sound_store(tmp_path: Path) -> None:
    # Several engine processes write one store and are SIGKILLed at random moments (a host
    # crash, an OOM kill): the store stays intact and usable by a new writer.
    import random
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    path = tmp_path / "audit.db"
    rng = random.Random(5)
    procs: list[subprocess.Popen[bytes]] = []
    kills = 0
    deadline = time.monotonic() + 6
    try:
        while time.monotonic() < deadline:
            while len(procs) < 3:
                procs.append(subprocess.Popen([sys.executable, "-c", _WRITER, str(path)]))
            time.sleep(rng.uniform(0.1, 0.4))
            victim = procs.pop(rng.randrange(len(procs)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert kills >= 10
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        written = db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()
    assert written > 0  # positive control: the writers did write before they were killed
    with AuditLog(path) as log:
        log.record_sandbox("sbx-after", "created", "container")
        assert log.query(sandbox_id="sbx-after")[0]["result"] == "created"
