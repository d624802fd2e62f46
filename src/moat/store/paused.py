"""Paused sandboxes on disk: one directory each, committed by a single rename (issue 11).

Trust domain: host engine (privileged). Layout under ``<state dir>/paused/``::

    <sandbox id>/record.json            the frozen config and bookkeeping (no secret values:
                                        invariant 3)
    <sandbox id>/ckpt/                  the tier's checkpoint, opaque (written by the driver)
    .tmp-<sandbox id>-<owner>-<nonce>/  a pause in progress
    .res-<sandbox id>-<owner>-<nonce>/  a resume in progress (claimed by one process)
    .del-<sandbox id>-<owner>-<nonce>/  a paused sandbox being deleted

``<owner>`` is ``<pid>.<start time>.<host token>`` of the process at work (the token names
the host and its boot: in a store shared by several machines another host's work is left
alone by this host's scan). A pause fills a ``.tmp-``
directory (checkpoint, then ``record.json`` written to a temporary name, fsynced and
renamed), fsyncs it, and renames it to ``<sandbox id>`` in one step: a SIGKILL at any moment
leaves either no ``<sandbox id>`` (the sandbox was still running; the crash killed it,
invariant 5) or a complete one. A resume first claims the directory by renaming it (one
process wins), and removes it once the sandbox serves, or renames it back. Deletion renames
first, then removes, so a half-removed directory never looks like a paused sandbox. ``scan``
at start-up reports and repairs what a crashed process left: its ``.tmp-`` and ``.del-``
are removed, its ``.res-`` goes back to ``<sandbox id>`` (the previous complete state), and
a directory without a readable record is removed. What a live process is working on is left
alone (two engines may share a state directory).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moat import paths
from moat.errors import NotFoundError, QuotaExceededError

log = logging.getLogger("moat.store")

__all__ = ["PausedStore", "Pending", "disk_usage", "host_token", "owner_of"]

RECORD = "record.json"
CHECKPOINT = "ckpt"
#: Record schema version; a record of another version is reported and left alone.
VERSION = 1
#: The most a record may hold (it is JSON the engine wrote; bounded anyway).
MAX_RECORD = 1 << 20
_ID = re.compile(r"[a-z0-9-]{4,64}")


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def host_token() -> str:
    """This host (8 hex digits of its name) and this boot (8 of its boot id): a store shared
    by several machines (a cluster's, ``moat.cluster.paused``) holds work directories whose
    pids mean nothing on another host."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        boot = ""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return host + hashlib.sha256(boot.encode()).hexdigest()[:8]


def _owner() -> str:
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}.{host_token()}"


def owner_of(name: str) -> tuple[int, str] | None:
    """(pid, host token) of a work directory's owner (None: not one, or an older name)."""
    try:
        pid, _start, token = name.rsplit("-", 2)[1].split(".")
        return int(pid), token
    except (IndexError, ValueError):
        return None


def _owner_alive(name: str) -> bool:
    """Whether the process named in a work directory's name still runs. Another host's
    process can't be told from here: it counts as alive (its work is left alone); one of an
    earlier boot of this host is dead."""
    try:
        owner = name.rsplit("-", 2)[1]
        parts = owner.split(".")
        if len(parts) == 3:
            mine = host_token()
            if parts[2][:8] != mine[:8]:
                return True
            if parts[2] != mine:
                return False
        pid, start = parts[0], parts[1]
        return _start_time(int(pid)) == int(start)
    except (IndexError, ValueError):
        return False


def _work(kind: str, sandbox_id: str) -> str:
    return f".{kind}-{sandbox_id}-{_owner()}-{secrets.token_hex(4)}"


def _sandbox_of(name: str) -> str:
    return name[5:].rsplit("-", 2)[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a host-written checkpoint; no symlinks
    followed)."""
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@dataclass
class Pending:
    """A pause in progress: fill ``checkpoint``, then ``PausedStore.commit``."""

    sandbox_id: str
    tmp: Path

    @property
    def checkpoint(self) -> Path:
        return self.tmp / CHECKPOINT


class PausedStore:
    """The paused sandboxes of one state directory."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = paths.state_dir() / "paused"
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._root

    # -- writing ----------------------------------------------------------------------

    def begin(self, sandbox_id: str) -> Pending:
        """A fresh temporary directory (with an empty ``ckpt/``) for a pause of ``sandbox_id``."""
        _check_id(sandbox_id)
        tmp = self.root / _work("tmp", sandbox_id)
        tmp.mkdir(mode=0o700)
        (tmp / CHECKPOINT).mkdir(mode=0o700)
        return Pending(sandbox_id, tmp)

    def commit(self, pending: Pending, record: dict[str, Any]) -> None:
        """Write the record into ``pending`` and rename it into place: the pause is durable.

        Raises OSError (disk full...) with nothing committed; the caller calls ``abort``.
        """
        data = json.dumps({"version": VERSION, **record}, sort_keys=True).encode()
        if len(data) > MAX_RECORD:
            raise QuotaExceededError("the sandbox's record is too large to pause")
        part = pending.tmp / (RECORD + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(part, pending.tmp / RECORD)
        for root, dirs, _files in os.walk(pending.tmp):
            for d in dirs:
                _fsync_dir(Path(root) / d)
        _fsync_dir(pending.tmp)
        final = self.root / pending.sandbox_id
        if final.exists():
            raise FileExistsError("a paused state of this sandbox exists already")
        os.rename(pending.tmp, final)
        _fsync_dir(self.root)

    def abort(self, pending: Pending) -> None:
        """Remove a pause that did not commit."""
        shutil.rmtree(pending.tmp, ignore_errors=True)

    def delete(self, sandbox_id: str) -> bool:
        """Remove a paused sandbox's state (rename first: never half a record). False: none."""
        _check_id(sandbox_id)
        final = self.root / sandbox_id
        gone = self.root / _work("del", sandbox_id)
        try:
            os.rename(final, gone)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def claim(self, sandbox_id: str) -> Path:
        """Take a paused sandbox's directory for a resume (NotFoundError: gone, or another
        process took it). Then ``release`` it (resumed) or ``unclaim`` it (failed)."""
        _check_id(sandbox_id)
        claimed = self.root / _work("res", sandbox_id)
        try:
            os.rename(self.root / sandbox_id, claimed)
        except FileNotFoundError:
            raise NotFoundError(f"sandbox {sandbox_id} was not found") from None
        return claimed

    def unclaim(self, claimed: Path, sandbox_id: str) -> None:
        """Put a claimed paused state back, unchanged (a failed resume)."""
        os.rename(claimed, self.root / sandbox_id)

    def release(self, claimed: Path, sandbox_id: str) -> None:
        """Remove a claimed paused state (the sandbox serves again)."""
        self.remove(self.retire(claimed, sandbox_id))

    def retire(self, claimed: Path, sandbox_id: str) -> Path:
        """The first half of ``release``: one rename, after which the state is no paused
        sandbox's (a crash leaves a ``.del-`` the scan removes); ``remove`` it next."""
        gone = self.root / _work("del", sandbox_id)
        os.rename(claimed, gone)
        return gone

    def remove(self, gone: Path) -> None:
        """The second half of ``release`` (blocking: fsync and removal, off any hot path)."""
        with contextlib.suppress(OSError):
            _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------

    def checkpoint(self, sandbox_id: str) -> Path:
        """The checkpoint directory of a paused sandbox (NotFoundError if none)."""
        _check_id(sandbox_id)
        path = self.root / sandbox_id / CHECKPOINT
        if not path.is_dir():
            raise NotFoundError(f"sandbox {sandbox_id} was not found")
        return path

    def load(self, sandbox_id: str) -> dict[str, Any]:
        _check_id(sandbox_id)
        return _read(self.root / sandbox_id / RECORD)

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every committed paused sandbox: (id, record); unreadable ones are skipped."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not _ID.fullmatch(entry.name):
                continue
            try:
                yield entry.name, _read(entry / RECORD)
            except (OSError, ValueError) as exc:
                log.warning("paused sandbox %s: unreadable record (%s)", entry.name, exc)

    def usage(self, sandbox_id: str) -> int:
        return disk_usage(self.root / sandbox_id)

    def scan(self, abandoned: Callable[[str], bool] | None = None) -> list[str]:
        """Report and remove what a crash left: unfinished pauses and deletions, and
        directories without a readable record. Returns what was removed (names).
        ``abandoned(name)``: which work directories are a dead owner's (default: those whose
        owner no longer runs; a cluster's server names a lost node's)."""
        dead = abandoned or (lambda name: not _owner_alive(name))
        removed: list[str] = []
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            work = name.startswith((".tmp-", ".del-", ".res-"))
            if work and not dead(name):
                continue  # another live engine's work in progress
            if name.startswith(".res-"):  # a resume that never finished: back to paused
                sid = _sandbox_of(name)
                if _ID.fullmatch(sid) and not (self.root / sid).exists():
                    log.warning("an unfinished resume of %s: its paused state is back", sid)
                    with contextlib.suppress(OSError):
                        os.rename(entry, self.root / sid)
                        removed.append(name)
                        continue
            broken = work
            if not broken and not name.startswith("."):
                # Only a state that is missing its record or checkpoint is half-written (a
                # commit renames both in at once); one this version can't read, or an I/O
                # error, is left alone and said: a paused sandbox is never deleted by guess.
                if not (entry / RECORD).is_file() or not (entry / CHECKPOINT).is_dir():
                    log.warning("paused sandbox %s is incomplete: removed", name)
                    broken = True
                else:
                    try:
                        _read(entry / RECORD)
                    except (OSError, ValueError) as exc:
                        log.warning("paused sandbox %s can't be read (%s): left alone", name, exc)
                        continue
            if broken:
                log.warning("removing a half-written paused state: %s", name)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(name)
        return removed


def _check_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not _ID.fullmatch(sandbox_id):
        raise NotFoundError("sandbox (malformed id) was not found")


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read(MAX_RECORD + 1)
    if len(data) > MAX_RECORD:
        raise ValueError("record too large")
    record = json.loads(data)
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise ValueError("unknown record version")
    return record
