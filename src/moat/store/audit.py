"""The audit trail: egress decisions, code executions, guard findings and lifecycle.

Trust domain: host engine. Rows are written by the gateway, engine and guard; their text
fields come partly from the sandbox (a refused request's method and host, an error's
name). Such text passes the sandbox's guard first (``set_scrubber``: registered values are
redacted, a canary is reported as a finding: invariant 3), then is escaped and capped
(:mod:`moat.store.text`). Egress rows carry a secret's *handle* only, never its value.

Nothing here writes SQLite on the caller's thread: ``record_*`` append to a queue that
:class:`~moat.store.writer.Writer` applies in batches. A sandbox can't flood the store:

* guard findings are aggregated: one row per (sandbox, call, label, channel, canary) with
  a ``count`` (a call ends with its ``exec`` row, or after ``window_s``);
* new rows per sandbox pass a token bucket; the excess is counted, per kind and call, in
  one ``audit_dropped`` row (never lost silently);
* the writer prunes by age and size (``AuditSettings``, ``MOAT_AUDIT_*``).

Storage: one SQLite file in WAL mode (readers never block the writer), by default
``<state dir>/audit.db``, mode 0600. Only SQLite may open it in a process that has it open
(closing any other descriptor of it drops this process's locks: :mod:`moat.store.health`);
a connection is never used or closed across ``fork()`` (a forked child can't use the
store: it fails closed; host code forks only to exec).
A corrupt or replaced store fails closed: :meth:`AuditLog.check` raises
:class:`~moat.errors.AuditUnavailableError` and the engine starts no sandbox (invariant 7).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moat.errors import AuditUnavailableError, InvalidArgumentError
from moat.paths import audit_db
from moat.store.health import Health, abandon, is_fatal, is_poisoned, make_private
from moat.store.settings import AuditSettings
from moat.store.text import clip, counter, inert
from moat.store.writer import Op, Writer

__all__ = ["AuditLog", "Scrubber", "shared_audit_log"]

log = logging.getLogger("moat.store")

#: ``scrub(text, channel) -> text``: a sandbox's guard over text it chose.
Scrubber = Callable[[str, str], str]

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
    label TEXT, channel TEXT, canary TEXT, tier TEXT, count INTEGER, last_ts REAL,
    tenant TEXT
);
CREATE INDEX IF NOT EXISTS events_sandbox ON events (sandbox_id, id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""
_COLUMNS = (
    "id", "ts", "kind", "sandbox_id", "method", "host", "port", "resolved_ip", "result",
    "reason", "bytes_up", "bytes_down", "secret", "language", "code_sha256", "duration_ms",
    "error_name", "label", "channel", "canary", "tier", "count", "last_ts", "tenant",
)  # fmt: skip
#: Columns of later versions, added to an older store when it is opened (additive only).
_ADDED = {"tier": "TEXT", "count": "INTEGER", "last_ts": "REAL", "tenant": "TEXT"}
KINDS = frozenset({"egress", "exec", "finding", "sandbox", "audit_dropped", "ingress", "operator"})
#: Sandboxes whose rate and aggregation state is kept (oldest forgotten beyond).
MAX_SANDBOXES = 10_000
#: Seconds ``query`` waits for queued rows to be written before it reads.
FLUSH_TIMEOUT = 10.0
#: Seconds :meth:`AuditLog.check` waits for the writer's start-up check of the file.
CHECK_TIMEOUT = 60.0
#: What a caller (maybe a model) is told: no host path (invariant 8); the log has the fix.
_UNUSABLE = (
    "the audit store is unusable, so no sandbox is started; the host's operator must replace"
    " it (the host log says how)"
)
_SCRUB_CHANNEL = "audit"


class _Bucket:
    """A token bucket (rows per second, burst)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Sandbox:
    """Per-sandbox producer state: its rate bucket and its current call's aggregates."""

    bucket: _Bucket
    since: float
    gen: int = 0
    seen: set[tuple[Any, ...]] = field(default_factory=set)


class AuditLog:
    """An append-only audit store; thread-safe, usable from any thread or event loop."""

    def __init__(
        self, path: str | Path | None = None, settings: AuditSettings | None = None
    ) -> None:
        self.path = Path(path) if path is not None else audit_db()
        self.settings = settings if settings is not None else AuditSettings.from_env()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the connection (writer thread and readers)
        self._health = Health(self.path)
        if is_poisoned(self.path):  # this process gave it up: its SQLite state is broken
            raise AuditUnavailableError(_UNUSABLE)
        self._db = self._open()
        self._health.remember_files()
        self._path_mode()
        self._mu = threading.Lock()  # producer state below
        self._sandboxes: collections.OrderedDict[str, _Sandbox] = collections.OrderedDict()
        self._pending: dict[tuple[Any, ...], list[Any]] = {}  # key -> [count, row, first ts]
        self._scrubbers: dict[str, Callable[[], Scrubber | None]] = {}
        #: sandbox id -> its tenant (from its ``created`` row): stamped on each of its rows
        self._tenants: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._tickets = itertools.count(1)
        self._closed = False
        self._ops: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._writer = Writer(
            self._db, self._lock, self._ops, self._take, self.settings, self._health
        )
        self._writer.start()
        _open_logs.add(self)

    # -- health --------------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the store can't be written (for the host's log and tests), else None."""
        return self._health.failure

    @property
    def closed(self) -> bool:
        """Closed, or inherited across fork() (unusable in the child)."""
        return self._closed

    def check(self, timeout: float = CHECK_TIMEOUT) -> None:
        """Raise :class:`AuditUnavailableError` unless the store can record: it passed the
        writer's start-up check (waited for, at most ``timeout``) and has not failed since.
        Blocking on a store's first use: call it off an event loop."""
        if self._closed:
            raise AuditUnavailableError("the audit store is closed")
        if not self._health.checked.wait(timeout):
            raise AuditUnavailableError("the audit store did not answer in time")
        if self._health.failure is not None:
            raise AuditUnavailableError(_UNUSABLE)

    @property
    def checked(self) -> bool:
        """Whether :meth:`check` would answer without waiting."""
        return self._health.checked.is_set()

    def _open(self) -> sqlite3.Connection:
        """Connect, set WAL mode and migrate the schema; a file SQLite can't use is an
        :class:`AuditUnavailableError` (logged with the path and the fix), not a traceback."""
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
            for name, sqltype in _ADDED.items():
                if name not in columns:  # a store written before the column existed
                    db.execute(f"ALTER TABLE events ADD COLUMN {name} {sqltype}")
        except sqlite3.Error as exc:
            if not is_fatal(exc):  # e.g. busy for longer than busy_timeout: not the file
                db.close()
                raise
            self._health.remember_files()
            self._health.fail("SQLite can't open it as a database", exc)
            abandon(db)
            raise AuditUnavailableError(_UNUSABLE) from None
        return db

    def _path_mode(self) -> None:
        make_private(self.path)

    # -- guarding sandbox-chosen text ----------------------------------------------------

    def set_scrubber(self, sandbox_id: str, scrub: Scrubber | None) -> None:
        """The guard of ``sandbox_id`` over the text it chooses (a bound method is held
        weakly: the guard goes with its sandbox). ``None`` removes it."""
        with self._mu:
            if scrub is None:
                self._scrubbers.pop(sandbox_id, None)
            elif hasattr(scrub, "__self__"):
                self._scrubbers[sandbox_id] = weakref.WeakMethod(scrub)
            else:
                self._scrubbers[sandbox_id] = lambda: scrub

    def _scrub(self, sandbox_id: str, value: str | None) -> str | None:
        if value is None:
            return None
        text = clip(value)
        with self._mu:
            ref = self._scrubbers.get(sandbox_id)
        scrub = ref() if ref is not None else None
        if scrub is None:
            return text
        try:
            return scrub(text, _SCRUB_CHANNEL)  # reports findings (and canaries) itself
        except Exception:
            log.exception("audit: the sandbox's guard failed on a row's text")
            return "[REDACTED:unscanned]"  # fail closed: unscanned text is not stored

    # -- producer side -------------------------------------------------------------------

    def _state(self, sandbox_id: str, now: float) -> _Sandbox:
        """Under ``_mu``: the sandbox's state; a new call window once the old one is due."""
        st = self._sandboxes.get(sandbox_id)
        if st is None:
            bucket = _Bucket(self.settings.rows_per_second, self.settings.burst)
            st = self._sandboxes[sandbox_id] = _Sandbox(bucket, now)
            while len(self._sandboxes) > MAX_SANDBOXES:
                self._sandboxes.popitem(last=False)
        elif now - st.since > self.settings.window_s:
            self._next_call(st, now)
        return st

    @staticmethod
    def _next_call(st: _Sandbox, now: float) -> None:
        st.gen += 1
        st.seen.clear()
        st.since = now

    def _put(self, op: Op) -> None:
        if op[0] == "row":  # under _mu: every row of a sandbox names its tenant (inv. 11)
            self._stamp(op[1])
        if self._closed:
            log.warning("audit: a row after close (or fork) was not written (%s)", op[0])
            return
        self._ops.put(op)

    def _accumulate(self, key: tuple[Any, ...], row: dict[str, Any], n: int = 1) -> None:
        """Under ``_mu``: add to an aggregate row; queue it if it wasn't pending."""
        pending = self._pending.get(key)
        if pending is not None:
            pending[0] += n
            return
        self._stamp(row)
        self._pending[key] = [n, row, time.time()]
        self._put(("agg", key, None))

    def _take(self, key: tuple[Any, ...]) -> tuple[int, dict[str, Any], float] | None:
        """The writer's side of ``_accumulate``."""
        with self._mu:
            pending = self._pending.pop(key, None)
        return None if pending is None else (pending[0], pending[1], pending[2])

    def _stamp(self, row: dict[str, Any]) -> None:
        tenant = self._tenants.get(str(row.get("sandbox_id")))
        if tenant is not None and "tenant" not in row:
            row["tenant"] = tenant

    def _drop(self, sandbox_id: str, st: _Sandbox, kind: str) -> None:
        """Under ``_mu``: one rate-limited row, counted in the call's audit_dropped row."""
        row = {"kind": "audit_dropped", "sandbox_id": inert(sandbox_id), "label": kind,
               "reason": "rate_limited"}  # fmt: skip
        self._accumulate((sandbox_id, st.gen, "audit_dropped", kind, None, None), row)

    def _admit(self, sandbox_id: str, kind: str, now: float) -> bool:
        """Under ``_mu``: whether a new row of ``sandbox_id`` may be written now."""
        st = self._state(sandbox_id, now)
        if st.bucket.take(now):
            return True
        self._drop(sandbox_id, st, kind)
        return False

    # -- the records ---------------------------------------------------------------------

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
    ) -> int | None:
        """One egress decision; returns a handle for :meth:`update_egress`, or None when the
        sandbox's row rate is spent (the row is counted as dropped)."""
        row = {
            "ts": time.time(),
            "kind": "egress",
            "sandbox_id": inert(sandbox_id),
            "method": inert(self._scrub(sandbox_id, method), "method"),
            "host": inert(self._scrub(sandbox_id, host), "host"),
            "port": counter(port),
            "resolved_ip": inert(resolved_ip),
            "result": "allow" if allowed else "deny",
            "reason": inert(reason, "reason"),
            "bytes_up": counter(bytes_up),
            "bytes_down": counter(bytes_down),
            "secret": inert(secret),
        }
        with self._mu:
            if not self._admit(sandbox_id, "egress", time.monotonic()):
                return None
            ticket = next(self._tickets)
            self._put(("row", row, ticket if allowed else None))
        return ticket

    def record_ingress(
        self,
        sandbox_id: str,
        *,
        method: str | None,
        port: int,
        allowed: bool,
        reason: str,
        bytes_up: int = 0,
        bytes_down: int = 0,
    ) -> None:
        """One connection from outside to a port inside the sandbox (issue 10): its bytes
        each way (``bytes_up``: to the sandbox). What flows is not guarded; this row is."""
        row = {
            "ts": time.time(),
            "kind": "ingress",
            "sandbox_id": inert(sandbox_id),
            "method": inert(method, "method"),
            "host": None,
            "port": counter(port),
            "resolved_ip": None,
            "result": "allow" if allowed else "deny",
            "reason": inert(reason, "reason"),
            "bytes_up": counter(bytes_up),
            "bytes_down": counter(bytes_down),
            "secret": None,
        }
        with self._mu:
            if not self._admit(sandbox_id, "ingress", time.monotonic()):
                return
            self._put(("row", row, None))

    def update_egress(
        self,
        row_id: int | None,
        *,
        reason: str,
        bytes_up: int,
        bytes_down: int,
        secret: str | None = None,
    ) -> None:
        """Complete an allowed decision's row when its tunnel ends (bytes moved, end reason)."""
        if row_id is None:
            return
        fields = {
            "reason": inert(reason, "reason"),
            "bytes_up": counter(bytes_up),
            "bytes_down": counter(bytes_down),
            "secret": inert(secret),
        }
        self._put(("update", row_id, fields))

    def record_exec(
        self,
        sandbox_id: str,
        language: str,
        code_sha256: str,
        duration_ms: int,
        error_name: str | None = None,
    ) -> None:
        """One code execution (the code's hash, never the code); it ends the call whose
        findings aggregate into one row per label."""
        row = {
            "ts": time.time(),
            "kind": "exec",
            "sandbox_id": inert(sandbox_id),
            "language": inert(language),
            "code_sha256": inert(code_sha256),
            "duration_ms": counter(duration_ms),
            "error_name": inert(self._scrub(sandbox_id, error_name), "error_name"),
            "result": "error" if error_name else "ok",
        }
        now = time.monotonic()
        with self._mu:
            if self._admit(sandbox_id, "exec", now):
                self._put(("row", row, None))
            self._next_call(self._state(sandbox_id, now), now)

    def record_sandbox(
        self,
        sandbox_id: str,
        event: str,
        tier: str,
        reason: str | None = None,
        tenant: str | None = None,
    ) -> None:
        """A sandbox's life: ``created`` / ``ended`` on the tier actually used (never
        rate-limited: two rows per sandbox). ``tenant`` (at ``created``) is recorded on this
        and every later row of the sandbox."""
        row = {
            "ts": time.time(),
            "kind": "sandbox",
            "sandbox_id": inert(sandbox_id),
            "result": inert(event),
            "tier": inert(tier),
            "reason": inert(self._scrub(sandbox_id, reason), "reason"),
        }
        with self._mu:
            if tenant is not None:
                self._tenants[sandbox_id] = inert(tenant, "tenant") or ""
                while len(self._tenants) > MAX_SANDBOXES:
                    self._tenants.popitem(last=False)
            self._put(("row", row, None))
            if event == "ended":
                self._tenants.pop(sandbox_id, None)
                self._scrubbers.pop(sandbox_id, None)
                self._sandboxes.pop(sandbox_id, None)
                self._put(("forget", sandbox_id, None))

    def record_finding(
        self, sandbox_id: str, label: str, channel: str, canary: str | bool | None = None
    ) -> None:
        """One guard finding (label and channel; never the matched content), aggregated
        with the same label's other sightings of this call into one row with a count."""
        row = {
            "kind": "finding",
            "sandbox_id": inert(sandbox_id),
            "label": inert(label, "label"),
            "channel": inert(channel, "label"),
            "canary": inert(canary) if canary not in (None, False) else None,
        }
        now = time.monotonic()
        with self._mu:
            st = self._state(sandbox_id, now)
            key = (sandbox_id, st.gen, "finding", row["label"], row["channel"], row["canary"])
            if key not in st.seen:  # a new row: it needs a token
                if not st.bucket.take(now):
                    self._drop(sandbox_id, st, "finding")
                    return
                st.seen.add(key)
            self._accumulate(key, row)

    def record_operator(
        self,
        action: str,
        *,
        allowed: bool,
        actor: str | None,
        sandbox_id: str | None = None,
        tenant: str | None = None,
        reason: str | None = None,
    ) -> None:
        """A state-changing action of an operator (the dashboard: login, logout, kill).
        ``actor``: who acted (tenant and key id, as text); ``tenant``: whose row it is (the
        actor's, or the owner of the sandbox acted on). Refusals pass a rate bucket of their
        own (a flood of bad logins can't flood the store); the excess is counted."""
        row = {
            "ts": time.time(),
            "kind": "operator",
            "sandbox_id": inert(sandbox_id or "-"),
            "method": inert(action, "method"),
            "result": "allow" if allowed else "deny",
            "reason": inert(reason, "reason"),
            "label": inert(actor, "label"),
            "tenant": inert(tenant, "tenant"),
        }
        with self._mu:
            if not allowed and not self._admit("-operator-refusals", "operator", time.monotonic()):
                return
            self._put(("row", row, None))

    # -- reading -------------------------------------------------------------------------

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until everything recorded so far is written; False on timeout, closed or
        failed (see :attr:`failure`)."""
        if self._closed or not self._writer.is_alive():
            return False
        done = threading.Event()
        self._ops.put(("flush", done, None))
        return done.wait(timeout) and self._health.failure is None

    def prune(self) -> bool:
        """Apply the retention bounds now (the writer also does every minute and every
        20,000 rows); waits for it like :meth:`flush`."""
        if self._closed:
            return False
        self._ops.put(("prune", None, None))
        return self.flush()

    def query(
        self,
        sandbox_id: str | None = None,
        denied_only: bool = False,
        kind: str | None = None,
        limit: int = 1000,
        tenant: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Rows, newest first, as dicts with None-valued columns left out (after what was
        recorded before the call is written); ``since``/``until``: unix times bounding
        ``ts`` (inclusive). Blocking: call it off an event loop."""
        if kind is not None and kind not in KINDS:
            raise InvalidArgumentError(
                "audit kind must be egress, exec, finding, sandbox, ingress, operator or "
                "audit_dropped"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidArgumentError("audit limit must be between 1 and 100000")
        self.flush()
        if self._health.failure is not None:  # never read through a connection given up on
            raise AuditUnavailableError(_UNUSABLE)
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
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        for bound, op in ((since, ">="), (until, "<=")):
            if bound is not None:
                if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                    raise InvalidArgumentError("audit time bounds must be unix times")
                where.append(f"ts {op} ?")
                args.append(float(bound))
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
        """Write what is queued, stop the writer and close the database (idempotent)."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
        self._ops.put(("stop", None, None))
        self._writer.join(timeout=30)
        if self._writer.is_alive():
            log.error("audit: the writer did not finish; queued rows may be lost")
            return
        _open_logs.discard(self)
        if self._health.failure is not None:
            if self._writer.lost:
                log.error("audit: %d operations were not written to the failed store %s",
                          self._writer.lost, self.path)  # fmt: skip
            return  # its connection is abandoned, never closed (moat.store.health)
        with self._lock:
            self._db.close()

    def _inherited(self) -> None:
        """In a child after fork(): this handle is the parent's. Its connection must not be
        used or closed here (SQLite's rule; closing could checkpoint the parent's view) and
        its writer thread does not exist: give it up without touching the file."""
        self._closed = True
        abandon(self._db)
        self._health.poison()  # new connections here would share the parent's lock state

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_open_logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()
_shared_mu = threading.Lock()
_shared: dict[str, AuditLog] = {}  # one store handle per file per process (a cache)


def shared_audit_log(path: Path | None = None) -> AuditLog:
    """The process's AuditLog for ``path`` (default: :func:`moat.paths.audit_db`): engines
    share one connection and one writer per file."""
    key = str((path if path is not None else audit_db()).resolve())
    with _shared_mu:
        log_ = _shared.get(key)
        if log_ is None or log_._closed:
            log_ = _shared[key] = AuditLog(key)
        return log_


@atexit.register
def _close_all() -> None:
    """At exit, write what every open store has queued (rows are never dropped silently)."""
    for log_ in list(_open_logs):
        log_.close()


def _after_fork_in_child() -> None:
    """A forked child can't use its parent's stores: neither the inherited connections nor
    new ones (SQLite's per-file lock state in this memory is the parent's). Recording
    through them drops rows with a warning; opening them fails closed. Host code forks only
    to exec. Runs before a ``preexec_fn`` too, so: no locks taken, no I/O, no logging."""
    global _shared_mu
    _shared_mu = threading.Lock()  # another thread may have held it at fork()
    for log_ in list(_open_logs):
        log_._inherited()
    _open_logs.clear()
    _shared.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
