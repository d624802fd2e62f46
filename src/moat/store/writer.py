"""The audit store's writer thread: the only place that writes the SQLite file.

Trust domain: host engine. Producers (the event loop, the gateway, the guard's callbacks)
only append to an in-memory queue; this thread applies what is queued in batches, one
transaction each, so no SQLite write ever runs on an event loop, and prunes the store to
its configured age and size (docs/audit.md). A flush marker is acknowledged only after the
batch holding it is committed (read-after-write for ``AuditLog.query``).

It checks the file first (``quick_check``) and, before each batch and each pruning pass, that
the store's files are still the ones its connection uses (:mod:`moat.store.health`). A
corrupt or replaced store is failed once, logged once with the operator's fix, and never
written, checkpointed or closed again by this process (invariant 7: fail closed).
"""

from __future__ import annotations

import collections
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from moat.store.health import Health, abandon, is_fatal
from moat.store.settings import AuditSettings

log = logging.getLogger("moat.store")

#: Most operations applied in one transaction.
BATCH = 2000
#: Seconds between two retention passes (and after this many new rows, sooner).
PRUNE_INTERVAL = 60.0
PRUNE_ROWS = 20_000
#: Row ids remembered for later updates (tunnel ends, aggregate counts); oldest forgotten.
MAX_OPEN = 100_000

# Operations: ("row", row, ticket | None), ("agg", key), ("update", ticket, fields),
# ("forget", sandbox_id), ("prune", None), ("flush", Event), ("stop", None).
Op = tuple[str, Any, Any]
#: Takes an aggregate's pending sightings: (count, row template, first seen) or None.
TakeAggregate = Callable[[tuple[Any, ...]], tuple[int, dict[str, Any], float] | None]


def insert(db: sqlite3.Connection, row: dict[str, Any]) -> int:
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    cur = db.execute(
        f"INSERT INTO events ({cols}) VALUES ({marks})",  # noqa: S608 - our column names
        tuple(row.values()),
    )
    return int(cur.lastrowid or 0)


def prune(db: sqlite3.Connection, settings: AuditSettings, now: float) -> int:
    """Delete rows past the age bound, then the oldest until the size bound holds."""
    deleted = 0
    if settings.retention_days > 0:
        cutoff = now - settings.retention_days * 86400
        deleted += db.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
    if settings.max_mb > 0:
        limit = settings.max_mb * 1024 * 1024
        for _ in range(50):
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            used = (pages - free) * page_size
            if used <= limit:
                break
            rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
            if rows == 0:
                break
            # down to 90% of the bound, so that pruning doesn't run on every pass
            n = max(100, int(rows * (used - 0.9 * limit) / used))
            deleted += db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)", (n,)
            ).rowcount
    if deleted:
        # a file made by this version shrinks (executescript steps the pragma to its end)
        db.executescript("PRAGMA incremental_vacuum;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return deleted


class Writer(threading.Thread):
    """Drains the queue into the database; see the module docstring."""

    def __init__(
        self,
        db: sqlite3.Connection,
        lock: threading.Lock,
        ops: queue.SimpleQueue[Op],
        take: TakeAggregate,
        settings: AuditSettings,
        health: Health,
    ) -> None:
        super().__init__(name="moat-audit-writer", daemon=True)
        self._db = db
        self._health = health
        self._lock = lock
        self._ops = ops
        self._take = take
        self._settings = settings
        self._tickets: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._open: collections.OrderedDict[tuple[Any, ...], int] = collections.OrderedDict()
        self._since_prune = 0
        self._next_prune = 0.0
        self.lost = 0  # operations a failed transaction or a failed store took with it

    def run(self) -> None:
        self._check_file()
        stop = False
        while not stop:
            try:
                batch = [self._ops.get(timeout=PRUNE_INTERVAL)]
            except queue.Empty:
                batch = []
            while len(batch) < BATCH:
                try:
                    batch.append(self._ops.get_nowait())
                except queue.Empty:
                    break
            done: list[threading.Event] = []
            stop = self._apply(batch, done)
            if self._usable():
                self._maybe_prune(force=any(op[0] == "prune" for op in batch))
            for event in done:
                event.set()

    def _fail(self, reason: str, exc: BaseException | None = None) -> None:
        self._health.fail(reason, exc)
        abandon(self._db)  # never checkpointed or closed again by this process

    def _check_file(self) -> None:
        """Before the first write: is the file sound? (``quick_check``: ~O(size), once.)"""
        try:
            with self._lock:
                row = self._db.execute("PRAGMA quick_check(1)").fetchone()
            if row is None or row[0] != "ok":
                self._fail(f"the file is corrupt ({str(row and row[0])[:200]!r})")
        except sqlite3.Error as exc:
            if is_fatal(exc):
                self._fail("the file is corrupt", exc)
            else:
                log.exception("audit: the store's start-up check did not run")
        finally:
            self._health.checked.set()

    def _usable(self) -> bool:
        """Whether this batch or pass may touch the file (else it is failed, once)."""
        if self._health.failure is not None:
            return False
        if not self._health.files_unchanged():
            self._fail(
                "its database or -shm file was replaced or removed while this process had it"
                " open (another process deleted them: this one had lost its locks, e.g. by"
                " closing a descriptor of the file outside SQLite)"
            )
            return False
        return True

    def _apply(self, batch: list[Op], done: list[threading.Event]) -> bool:
        stop = False
        work = [op for op in batch if op[0] not in ("flush", "stop", "prune")]
        for kind, arg, _ in batch:
            if kind == "flush":
                done.append(arg)
            elif kind == "stop":
                stop = True
        if not work:
            return stop
        if not self._usable():
            self.lost += len(work)
            return stop
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for op in work:
                    self._one(op)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.lost += len(work)
                if is_fatal(exc):
                    self._fail("SQLite found it corrupt or could not read or write it", exc)
                    return stop  # no rollback either: nothing more goes through it
                log.exception("audit: a batch of %d operations was not written", len(work))
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        return stop

    def _one(self, op: Op) -> None:
        kind, arg, extra = op
        if kind == "row":
            row_id = insert(self._db, arg)
            self._since_prune += 1
            if extra is not None:
                self._remember(self._tickets, extra, row_id)
        elif kind == "update":
            if arg in self._tickets:
                row_id = self._tickets.pop(arg)
                self._db.execute(
                    "UPDATE events SET reason = ?, bytes_up = ?, bytes_down = ?,"
                    " secret = COALESCE(?, secret) WHERE id = ? AND kind = 'egress'",
                    (extra["reason"], extra["bytes_up"], extra["bytes_down"], extra["secret"],
                     row_id),
                )  # fmt: skip
        elif kind == "agg":
            self._aggregate(arg)
        elif kind == "forget":
            for key in [k for k in self._open if k[0] == arg]:
                del self._open[key]

    def _aggregate(self, key: tuple[Any, ...]) -> None:
        taken = self._take(key)
        if taken is None:
            return
        count, template, first = taken
        row_id = self._open.get(key)
        if row_id is not None:
            cur = self._db.execute(
                "UPDATE events SET count = count + ?, last_ts = ? WHERE id = ?",
                (count, time.time(), row_id),
            )
            if cur.rowcount:
                return  # else the row was pruned meanwhile: start a new one
        row = dict(template, ts=first, count=count, last_ts=time.time())
        self._remember(self._open, key, insert(self._db, row))
        self._since_prune += 1

    @staticmethod
    def _remember(table: collections.OrderedDict[Any, int], key: Any, row_id: int) -> None:
        table[key] = row_id
        while len(table) > MAX_OPEN:
            table.popitem(last=False)

    def _maybe_prune(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_prune and self._since_prune < PRUNE_ROWS:
            return
        self._next_prune = now + PRUNE_INTERVAL
        self._since_prune = 0
        with self._lock:
            try:
                n = prune(self._db, self._settings, time.time())
            except sqlite3.Error as exc:
                if is_fatal(exc):
                    self._fail("SQLite found it corrupt or could not read or write it", exc)
                else:
                    log.exception("audit: pruning failed")
                return
        if n:
            log.info("audit: pruned %d rows (retention)", n)
