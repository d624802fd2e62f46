"""The audit store survives what corrupted the shared one, and fails closed when it can't.

The incident (docs/audit.md): a test read the live store's files with ``read_bytes()`` in the
process that had the store open. Closing that descriptor dropped the process's POSIX locks,
SQLite's included; the next process to close its connection found itself alone, deleted
``-wal`` and ``-shm``, and two write-ahead logs then fed one file: "database disk image is
malformed". Every check here looks at the file from outside (``integrity_check`` through a
fresh connection) and has a positive control.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import require_tier
from tests.killcheck import cgroup_dirs

from moat.errors import AuditUnavailableError
from moat.store import AuditLog, shared_audit_log

ROWS = 300


def _other_process_writes(path: Path, tag: str, rows: int = 200) -> None:
    """Another process opens the store, writes and closes it (a `moat` CLI run, a test run)."""
    code = (
        "import sys\nfrom moat.store import AuditLog\n"
        "log = AuditLog(sys.argv[1])\n"
        "for i in range(int(sys.argv[3])):\n"
        "    log.record_sandbox('sbx-' + sys.argv[2], 'created', 'container')\n"
        "assert log.flush()\nlog.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), tag, str(rows)], check=True, timeout=120)


def _outside(path: Path, sql: str) -> str:
    """One SQL answer about the file, from a fresh process: this one may hold the file's
    broken state (SQLite shares it among a process's connections)."""
    code = (
        "import sqlite3, sys\ntry:\n"
        "    db = sqlite3.connect(sys.argv[1])\n"
        "    print('|'.join(str(r[0]) for r in db.execute(sys.argv[2])))\n"
        "except sqlite3.DatabaseError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), sql],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.strip()


def _integrity(path: Path) -> str:
    return _outside(path, "PRAGMA integrity_check")


def _count(path: Path, sandbox_id: str) -> int:
    return int(_outside(path, f"SELECT count(*) FROM events WHERE sandbox_id = '{sandbox_id}'"))


def test_store_whose_locks_were_dropped_fails_closed_and_the_file_stays_sound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    try:
        for _ in range(ROWS):
            log.record_sandbox("sbx-long", "created", "container")
        assert log.flush()
        # The mistake, made on purpose: this process opens and closes the store's file itself.
        path.read_bytes()
        # Another process comes and goes: believing it is alone, it deletes -wal and -shm.
        _other_process_writes(path, "first")
        assert not Path(f"{path}-shm").exists()  # positive control: the split did happen
        with caplog.at_level(logging.ERROR, logger="moat.store"):
            for _ in range(ROWS):
                log.record_sandbox("sbx-long", "created", "container")
            assert not log.flush()  # nothing more goes through the orphaned connection
            for _ in range(ROWS):
                log.record_sandbox("sbx-long", "created", "container")
            log.flush()
        assert log.failure is not None and "replaced or removed" in log.failure
        with pytest.raises(AuditUnavailableError) as err:
            log.check()
        assert str(tmp_path) not in str(err.value)  # invariant 8: the path is in the log only
        with pytest.raises(AuditUnavailableError):
            log.query()
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(failures) == 1 and str(path) in failures[0].getMessage()  # once, with the fix
        assert "aside" in failures[0].getMessage() and failures[0].exc_info is None
        with pytest.raises(AuditUnavailableError):
            AuditLog(path)  # nor a new connection: it would share the broken state
        _other_process_writes(path, "second")
    finally:
        log.close()  # a failed store's connection is abandoned: no checkpoint of its view
    _other_process_writes(path, "third")
    assert _integrity(path) == "ok"
    assert _count(path, "sbx-long") == ROWS
    assert _count(path, "sbx-first") == _count(path, "sbx-second") == 200


def test_forked_child_never_uses_its_parents_store(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = shared_audit_log(path)
    log.record_sandbox("sbx-parent", "created", "container")
    assert log.flush()
    # Forked while the connection is busy (its lock held), as the writer thread may hold it.
    with log._lock:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            status = 1
            try:
                from moat.store import audit as store_audit

                assert log.closed  # inherited: neither used nor closed here
                log.record_sandbox("sbx-child", "created", "container")  # dropped, warned
                assert not log.flush()
                try:
                    shared_audit_log(path)
                    status = 4  # a new connection would share the parent's lock state
                except AuditUnavailableError:
                    store_audit._close_all()  # what interpreter exit runs: must not hang
                    status = 0
            finally:
                os._exit(status)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the store it inherited")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    log.record_sandbox("sbx-parent", "ended", "container")
    assert log.flush() and not log.closed  # the parent's store is untouched by the child
    assert {r["sandbox_id"] for r in log.query()} == {"sbx-parent"}
    assert _integrity(path) == "ok"


def test_a_file_that_is_not_a_database_is_a_typed_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"this is not a database" * 300)
    with caplog.at_level(logging.ERROR, logger="moat.store"):
        with pytest.raises(AuditUnavailableError) as err:
            AuditLog(path)
    assert str(tmp_path) not in str(err.value) and err.value.__cause__ is None
    assert any(str(path) in r.getMessage() and "aside" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == b"this is not a database" * 300  # left for the operator


def _corrupt_pages(path: Path) -> None:
    """Zero the last pages of a store, the way the incident's file lost pages 9701-9758."""
    with AuditLog(path) as log:
        for i in range(3000):
            log.record_egress(f"sbx-{i % 7}", method="GET", host=f"h{i}.example.test", port=443,
                              resolved_ip=None, allowed=False, reason="not_allowed")  # fmt: skip
        assert log.flush()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:  # no store is open in this process now
        f.seek(size - 6 * 4096)
        f.write(bytes(4 * 4096))


def test_a_corrupt_store_fails_closed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    _corrupt_pages(path)
    assert _integrity(path) != "ok"  # positive control
    with caplog.at_level(logging.ERROR, logger="moat.store"):
        log = AuditLog(path)
        try:
            with pytest.raises(AuditUnavailableError):
                log.check()
            for _ in range(50):
                log.record_sandbox("sbx-x", "created", "container")
                assert not log.flush()
        finally:
            log.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "corrupt" in errors[0].getMessage() and str(path) in errors[0].getMessage()
    assert sum("unusable" in r.getMessage() for r in errors) == 1  # not a traceback per write


def test_engine_refuses_sandboxes_while_the_store_is_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moat.engine.engine import Engine
    from moat.engine.resolve import resolve

    require_tier("container")
    path = tmp_path / "audit.db"
    _corrupt_pages(path)
    monkeypatch.setenv("MOAT_AUDIT_DB", str(path))
    engine = Engine(pool={})
    before = _our_cgroups()
    with pytest.raises(AuditUnavailableError) as err:
        asyncio.run(engine.create(resolve(isolation="container", timeout=30.0)))
    assert str(tmp_path) not in str(err.value)
    assert not engine.sessions and _our_cgroups() <= before  # nothing was started
    engine.audit.close()


def _our_cgroups() -> set[Path]:
    """This process's sandbox cgroups, seen from outside (their names carry our pid)."""
    mine = f".{os.getpid()}."
    return {p for p in cgroup_dirs(lambda n: mine in n) if p.parent.name == "moat"}
