"""Stress the audit store the way the corrupted shared one was used, then check the file.

    .venv/bin/python bench/stress_audit_store.py [--seconds 90] [--sandboxes 2] [--unsafe-raw-read]

Against a private store (``MOAT_AUDIT_DB`` in a temp dir, ``MOAT_AUDIT_MAX_MB`` small so the
writers prune all the time), for ``--seconds`` (at most 170): real container sandboxes
created, used (guard findings, refused egress, executions) and killed by several engine
processes; flood writers that prune; ``moat audit`` runs that open and close the store;
a process that forks children which try the inherited store; and random SIGKILLs of all of
them, now and then all at once (a lull: only a ``moat audit`` run then comes and goes, as
when test runs end). ``--unsafe-raw-read`` adds one long-lived writer that reads the store's
files with ``read_bytes()`` in its own process (what a test did before the file was found
malformed): with this version it must fail closed and leave the file sound. At the end the file is
checked from a fresh process (``PRAGMA integrity_check``). Prints one JSON line; exit 1 if
the file is not sound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SANDBOX = """
import os, sys, time
from moat import Sandbox
from moat.errors import SandboxError
DENIED = ('import urllib.request\\ntry:\\n urllib.request.urlopen("http://denied.test/x")'
          '\\nexcept Exception as e:\\n print(type(e).__name__)')
while True:
    try:
        with Sandbox.create(isolation="container", timeout=60,
                            sensitive={"stress-value-1234": "STRESS"}) as s:
            for i in range(3):
                s.run_code("print('stress-value-1234'); 6 * 7")
            s.run_code(DENIED)
    except SandboxError as exc:
        print("sandbox error:", type(exc).__name__, exc, file=sys.stderr, flush=True)
        time.sleep(0.5)
"""

FLOOD = """
import random, sys, time
from moat.store import AuditLog
log = AuditLog()
n = 0
while True:
    sid = f"sbx-flood{random.getrandbits(16):04x}"
    for i in range(200):
        log.record_egress(sid, method="GET", host=f"h{i}.example.test", port=443,
                          resolved_ip="192.0.2.1", allowed=bool(i % 2), reason="stress")
    log.record_sandbox(sid, "ended", "container")
    n += 1
    if n % 5 == 0:
        log.prune()
    log.flush()
    if random.random() < 0.05:
        log.close()
        sys.exit(0)  # a clean exit now and then: the close path, the last-closer path
"""

FORKER = """
import os, sys, time
from moat.store import shared_audit_log
try:
    from moat.errors import AuditUnavailableError
except ImportError:  # a version without it (to compare): any use in the child is wrong
    class AuditUnavailableError(Exception):
        pass
log = shared_audit_log()
while True:
    log.record_sandbox("sbx-forker", "created", "container")
    log.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            log.record_sandbox("sbx-forker-child", "created", "container")  # dropped
            try:
                shared_audit_log()
            except AuditUnavailableError:
                status = 0
        finally:
            os._exit(status)
    _, st = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(st) != 0:
        print("forked child used the inherited store", file=sys.stderr, flush=True)
    time.sleep(0.05)
"""

RAW_READER = """
import sys, time
from pathlib import Path
from moat.store import AuditLog
from moat.paths import audit_db
log = AuditLog()
path = audit_db()
while True:
    for i in range(50):
        log.record_sandbox("sbx-rawreader", "created", "container")
    log.flush()
    for suffix in ("", "-wal", "-shm"):  # the mistake: this process opens the files itself
        f = Path(str(path) + suffix)
        if f.exists():
            f.read_bytes()
    if getattr(log, "failure", None) is not None:
        print("raw reader failed closed:", log.failure[:60], file=sys.stderr, flush=True)
        time.sleep(3600)
    time.sleep(0.2)
"""

CHECK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
try:
    ok = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
    rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
except sqlite3.DatabaseError as exc:
    ok, rows = [str(exc)], -1
print(ok, rows)
"""


def _spawn(kind: str, code: str, env: dict[str, str], logdir: Path) -> subprocess.Popen[bytes]:
    err = open(logdir / f"{kind}.log", "ab")  # the child holds it
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True)  # fmt: skip


def _cli(env: dict[str, str]) -> None:
    """`moat audit`: opens the store, reads, closes it (the last one out checkpoints)."""
    subprocess.run([sys.executable, "-m", "moat.cli", "audit", "--limit", "5"], env=env,
                   capture_output=True, timeout=60, check=False)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--sandboxes", type=int, default=2)
    ap.add_argument("--floods", type=int, default=2)
    ap.add_argument("--unsafe-raw-read", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="moat-audit-stress-"))
    db = work / "audit.db"
    env = {**os.environ, "MOAT_AUDIT_DB": str(db), "MOAT_AUDIT_MAX_MB": "0.5",
           "MOAT_AUDIT_ROWS_PER_SECOND": "100000", "MOAT_AUDIT_BURST": "100000",
           "MOAT_WARM_POOL": "0"}  # fmt: skip
    kinds = {"forker": FORKER}
    kinds.update({f"sandbox{i}": SANDBOX for i in range(args.sandboxes)})
    kinds.update({f"flood{i}": FLOOD for i in range(args.floods)})
    procs = {k: _spawn(k, code, env, work) for k, code in kinds.items()}
    raw = _spawn("rawreader", RAW_READER, env, work) if args.unsafe_raw_read else None
    kills = cli_runs = respawns = lulls = 0
    deadline = time.monotonic() + min(args.seconds, 170)
    while time.monotonic() < deadline:
        time.sleep(rnd.uniform(0.5, 2.0))
        victim = rnd.choice(list(procs))
        if rnd.random() < 0.25:  # a lull: every run ends at once, a CLI run comes and goes
            for p in procs.values():
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            kills += len(procs)
            lulls += 1
            _cli(env)
            cli_runs += 1
        elif rnd.random() < 0.6:
            os.killpg(procs[victim].pid, signal.SIGKILL)  # the engine and its sandboxes
            procs[victim].wait()
            kills += 1
        for k, p in procs.items():
            if p.poll() is not None:
                procs[k] = _spawn(k, kinds[k], env, work)
                respawns += 1
        _cli(env)
        cli_runs += 1
    for p in [*procs.values(), *([raw] if raw else [])]:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    out = subprocess.run([sys.executable, "-c", CHECK, str(db)], capture_output=True,
                         text=True, check=True, timeout=300).stdout  # fmt: skip
    logs = {f.stem: f.read_text(errors="replace") for f in work.glob("*.log")}
    result = {
        "seconds": min(args.seconds, 170),
        "sigkills": kills,
        "lulls": lulls,
        "respawns": respawns,
        "cli_runs": cli_runs,
        "integrity_and_rows": out.strip(),
        "raw_reader_failed_closed": "failed closed" in logs.get("rawreader", ""),
        "forked_child_used_store": sum("inherited store" in t for t in logs.values()),
        "malformed_in_logs": sum(t.count("malformed") for t in logs.values()),
        "sandbox_errors": sum(t.count("sandbox error") for t in logs.values()),
        "dir": str(work),
    }
    print(json.dumps(result))
    return 0 if out.startswith("['ok']") else 1


if __name__ == "__main__":
    sys.exit(main())
