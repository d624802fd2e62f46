"""Whether an audit store's file can still be trusted, and what to do when it can't.

Trust domain: host engine. SQLite's locks between processes are POSIX advisory locks, which
belong to a process and an inode: closing *any* descriptor of the file in a process drops
all of that process's locks on it, even one SQLite never saw (``Path.read_bytes()`` of the
store, a backup with ``shutil.copy``). Another process then finds itself alone, checkpoints
and deletes ``-wal`` and ``-shm`` while this one still writes through them: two write-ahead
logs on one file, and the file ends up malformed (it happened: docs/audit.md). The same
follows from carrying a connection across ``fork()``. This module notices the first kind
(the store's files are no longer the ones its connection uses) and a corrupt file, so the
store fails closed (invariant 7) instead of writing on.

A connection given up on is never closed (closing may checkpoint its stale view into the
file), and SQLite shares one lock and shared-memory state per file among all connections of
a process: a new connection to that file in this process would inherit the broken state. So
the file is *poisoned* for the rest of the process: opening it again fails closed too, until
the operator replaces it (a new file) or the process restarts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("moat.store")

#: What the operator does about an unusable store (logged with its path, never raised).
FIX = (
    "stop every moat process using it, move {path} and its -wal and -shm files aside"
    " together (e.g. {path}.corrupt-<time>), then start again: a new store is created"
)
#: Primary SQLite result codes after which the file is not written again by this process.
_FATAL = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR})

FileId = tuple[int, int] | None

# Process-wide by nature, like SQLite's own per-file state that it mirrors: files this
# process must not open again (device, inode).
_poisoned: set[tuple[int, int]] = set()


def is_fatal(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is corrupt or its I/O broke (not: busy, disk full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by the module itself (closed connection...), not by SQLite
        return False
    return (code & 0xFF) in _FATAL


def file_ids(path: Path) -> tuple[FileId, FileId]:
    """(device, inode) of the database and of its ``-shm`` file (None: missing)."""

    def one(p: str) -> FileId:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    return one(str(path)), one(f"{path}-shm")


def poison(file_id: FileId) -> None:
    """Never open this file again in this process (see the module docstring)."""
    if file_id is not None:
        _poisoned.add(file_id)


def is_poisoned(path: Path) -> bool:
    """Whether ``path`` is a file this process gave up on."""
    file_id = file_ids(path)[0]
    return file_id is not None and file_id in _poisoned


def abandon(db: sqlite3.Connection) -> None:
    """Never close ``db`` in this process, not even at interpreter exit.

    Closing runs a checkpoint when SQLite believes it is the last user: from a connection
    that lost its locks or was inherited across fork(), that writes a stale view into the
    shared file. An abandoned connection's descriptors and memory go with the process, like
    after a SIGKILL, which SQLite is built to survive.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(db))


class Health:
    """One store's verdict: ``failure`` is None while it can be written; set once, logged once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failure: str | None = None
        self.checked = threading.Event()  # the writer's start-up check is done
        self._ids: tuple[FileId, FileId] = (None, None)

    def remember_files(self) -> None:
        """Note the files the connection uses now (after it opened them in WAL mode)."""
        self._ids = file_ids(self.path)

    def poison(self) -> None:
        """Never open this store's file again in this process (forked child, failure)."""
        poison(self._ids[0])

    def files_unchanged(self) -> bool:
        """False once the database or its ``-shm`` at the path are not the connection's."""
        return file_ids(self.path) == self._ids

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Stop writing: log the reason, the path and the fix once (invariant 8: the path
        goes to the host log only)."""
        if self.failure is not None:
            return
        self.failure = reason
        self.poison()
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        log.error(
            "audit: the store %s is unusable: %s%s; no row is written to it and no sandbox"
            " starts until it is replaced. Fix: %s",
            self.path, reason, detail, FIX.format(path=self.path),
        )  # fmt: skip


def make_private(path: Path) -> None:
    """Mode 0600 for a database and its ``-wal``/``-shm``, by path only.

    SQLite creates the side files with the database file's mode at that moment (0644 under a
    common umask, before the first chmod), and later ones with its current mode; so the side
    files made at first open are fixed here. chmod opens no descriptor: closing one would drop
    this process's SQLite locks on the file (the corruption of docs/audit.md).
    """
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            p.chmod(0o600)
        except OSError:  # a side file not there (yet): it will take the database's mode
            pass
