"""Directory watches with inotify (through ctypes: the agent stays stdlib only).

One inotify instance per watch, read by a thread of its own; stopping a watch closes the
instance, which frees every watch descriptor it held. Bounded (``moat.protocol.watch``): at
most MAX_WATCHERS watches and MAX_WATCH_DIRS watched directories per sandbox; the agent keeps
no queue of its own (the kernel's inotify queue is the only one, and its overflow is
reported as ``lost``). Names are paths relative to the watched directory, as envd's.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading

from moat.agent.channel import Channel
from moat.agent.files import FileError, resolve
from moat.protocol import MsgType
from moat.protocol.watch import MAX_EVENTS_PER_FRAME, MAX_WATCH_DIRS, MAX_WATCHERS

# The agent starts in every sandbox: typing is only imported for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip
#: (mask bit, E2B event type), in the order one kernel event's bits are reported.
_TYPES = (
    (IN_CREATE, "create"),
    (IN_MOVED_TO, "create"),
    (IN_MODIFY, "write"),
    (IN_ATTRIB, "chmod"),
    (IN_MOVED_FROM, "rename"),
    (IN_DELETE, "remove"),
)
_HEADER = struct.Struct("iIII")
#: Bytes of names in one FS_EVENTS frame (well under MAX_FRAME with the JSON around them).
_FRAME_BYTES = 256 * 1024

_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        import ctypes  # here, not at start-up: only watches pay for it

        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = (libc, ctypes)
    return _libc


class _Limit(Exception):
    """The sandbox's cap on watched directories was reached."""


class Watch:
    def __init__(self, owner: Watches, rid: int, root: str, recursive: bool) -> None:
        self.owner = owner
        self.rid = rid
        self.root = root
        self.recursive = recursive
        self.fd = -1
        self.wds: dict[int, str] = {}  # watch descriptor -> path relative to the root
        self.stopping = False
        self.closed = False
        self.ended = False
        self.reading = threading.Lock()
        self.mu = threading.Lock()  # close() vs stop(): never write to a closed (reused) fd
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # -- watch descriptors ---------------------------------------------------------------

    def _add(self, rel: str, first: bool = False) -> None:
        """Watch directory ``rel`` (raises OSError; _Limit past the sandbox's cap)."""
        libc, ctypes = _inotify()
        if not self.owner.take_dir():
            raise _Limit
        path = os.path.join(self.root, rel) if rel else self.root
        flags = _MASK if first else _MASK | IN_DONT_FOLLOW
        wd = libc.inotify_add_watch(self.fd, os.fsencode(path), flags)
        if wd < 0:
            self.owner.give_dirs(1)
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if wd in self.wds:  # the same directory again (a hard-linked or re-added one)
            self.owner.give_dirs(1)
        self.wds[wd] = rel

    def _add_tree(self, rel: str, found: list[tuple[str, str]] | None) -> bool:
        """Watch ``rel`` and, recursively, the directories under it; False if some could
        not be watched (the cap, or one vanished). ``found`` collects what already exists
        there (a new directory's content, made before its watch was in place)."""
        complete = True
        try:
            self._add(rel)
        except _Limit:
            return False
        except OSError:
            return True  # gone already (or not a directory any more): its removal is reported
        base = os.path.join(self.root, rel)
        for dirpath, dirnames, filenames in os.walk(base):
            sub = os.path.relpath(dirpath, self.root)
            if found is not None:
                found.extend((os.path.join(sub, n), "create") for n in (*dirnames, *filenames))
            for name in dirnames:
                try:
                    self._add(os.path.join(sub, name))
                except _Limit:
                    dirnames.clear()
                    complete = False
                except OSError:
                    pass
        return complete

    def _drop_tree(self, rel: str) -> None:
        """Stop watching ``rel`` and what is under it (it moved away)."""
        libc, _ = _inotify()
        prefix = rel + "/"
        for wd, path in list(self.wds.items()):
            if path == rel or path.startswith(prefix):
                libc.inotify_rm_watch(self.fd, wd)  # its IN_IGNORED drops it from wds

    # -- the watch -------------------------------------------------------------------------

    def open(self) -> None:
        """Set the watches up; FileError if the path can't be watched."""
        libc, ctypes = _inotify()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise FileError("busy", "the sandbox can't watch more directories")
            raise FileError("io", "file watching is not available in this sandbox")
        self.fd = fd
        try:
            self._add("", first=True)
            if self.recursive:
                for dirpath, dirnames, _ in os.walk(self.root):
                    sub = os.path.relpath(dirpath, self.root)
                    for name in dirnames:
                        try:
                            self._add(os.path.normpath(os.path.join(sub, name)))
                        except OSError:
                            pass  # vanished meanwhile
        except _Limit:
            self.close()
            raise FileError("busy", "too many directories to watch in this sandbox") from None
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOENT:
                raise FileError("not_found", "no such directory") from None
            if exc.errno == errno.ENOTDIR:
                raise FileError("invalid", "the path is not a directory") from None
            if exc.errno == errno.ENOSPC:
                raise FileError("busy", "the sandbox can't watch more directories") from None
            raise FileError("io", exc.strerror or "could not watch the directory") from None

    def close(self) -> None:
        """Free the inotify instance (and with it every watch descriptor). Idempotent."""
        with self.reading, self.mu:  # never while a flush reads the fd
            if self.closed:
                return
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self.owner.give_dirs(len(self.wds))
            self.wds.clear()
            os.close(self.wake_r)
            os.close(self.wake_w)

    def stop(self) -> None:
        with self.mu:
            self.stopping = True
            if not self.closed:
                try:
                    os.write(self.wake_w, b"x")
                except OSError:
                    pass

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.owner.forget(self.rid)
            self.close()
            self.owner.ch.done(self.rid)

    def _loop(self) -> None:
        while not self.stopping:
            ready, _, _ = select.select([self.fd, self.wake_r], [], [])
            if self.fd in ready and self.drain():
                return

    def drain(self) -> bool:
        """Read and send what the kernel has queued (the watch's thread, or a flush: one at a
        time, so events keep their order); True once the watched directory is gone."""
        with self.reading:
            while not self.closed and not self.ended:
                try:
                    data = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    break
                events, lost, self.ended = self._parse(data)
                self._send(events, lost)
            return self.ended

    def _parse(self, data: bytes) -> tuple[list[tuple[str, str]], bool, bool]:
        events: list[tuple[str, str]] = []
        lost = ended = False
        pos = 0
        while pos + _HEADER.size <= len(data):
            wd, mask, _cookie, size = _HEADER.unpack_from(data, pos)
            raw = data[pos + _HEADER.size : pos + _HEADER.size + size].rstrip(b"\0")
            pos += _HEADER.size + size
            if mask & IN_Q_OVERFLOW:
                lost = True
                continue
            rel = self.wds.get(wd)
            if rel is None:
                continue
            if mask & IN_IGNORED:
                del self.wds[wd]
                self.owner.give_dirs(1)
                if rel == "":
                    ended = True  # the watched directory itself is gone
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if rel == "":  # the watched directory itself (a subdirectory's is the
                    kind = "remove" if mask & IN_DELETE_SELF else "rename"  # parent's event)
                    events.append(("", kind))
                continue
            name = os.path.join(rel, os.fsdecode(raw)) if rel else os.fsdecode(raw)
            for bit, kind in _TYPES:
                if mask & bit and (not events or events[-1] != (name, kind)):
                    events.append((name, kind))
            if self.recursive and mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    found: list[tuple[str, str]] = []
                    lost = not self._add_tree(name, found) or lost
                    events.extend(found)
                elif mask & IN_MOVED_FROM:
                    self._drop_tree(name)
        return events, lost, ended

    def _send(self, events: list[tuple[str, str]], lost: bool) -> None:
        batch: list[list[str]] = []
        size = 0
        for name, kind in events:
            if len(batch) >= MAX_EVENTS_PER_FRAME or size + len(name) > _FRAME_BYTES:
                self.ch_send(batch, False)
                batch, size = [], 0
            batch.append([name, kind])
            size += len(name) + 16
        if batch or lost:
            self.ch_send(batch, lost)

    def ch_send(self, batch: list[list[str]], lost: bool) -> None:
        fields: dict[str, Any] = {"events": batch}
        if lost:
            fields["lost"] = True
        self.owner.ch.send(MsgType.FS_EVENTS, self.rid, **fields)


class Watches:
    """The sandbox's watches, by the id of the request that started each."""

    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.mu = threading.Lock()
        self.items: dict[int, Watch] = {}
        self.dirs = 0

    def take_dir(self) -> bool:
        with self.mu:
            if self.dirs >= MAX_WATCH_DIRS:
                return False
            self.dirs += 1
            return True

    def give_dirs(self, n: int) -> None:
        with self.mu:
            self.dirs = max(0, self.dirs - n)

    def forget(self, rid: int) -> None:
        with self.mu:
            self.items.pop(rid, None)

    def start(self, rid: int, path: str, recursive: bool) -> None:
        """Start watching ``path``: WATCHING, then FS_EVENTS; FileError if it can't."""
        root = resolve(path)
        with self.mu:
            if len(self.items) >= MAX_WATCHERS:
                raise FileError(
                    "busy", f"too many watches in this sandbox (at most {MAX_WATCHERS})"
                )
            watch = Watch(self, rid, root, recursive)
            self.items[rid] = watch
        try:
            watch.open()
        except BaseException:
            watch.close()
            self.forget(rid)
            raise
        self.ch.send(MsgType.WATCHING, rid)
        try:
            threading.Thread(target=watch.run, daemon=True).start()
        except RuntimeError:  # no thread (pids exhausted): don't leave it half there
            watch.close()
            self.forget(rid)
            self.ch.done(rid)

    def stop(self, target: int) -> bool:
        with self.mu:
            watch = self.items.get(target)
        if watch is None:
            return False
        watch.stop()
        return True

    def stop_all(self) -> None:
        """After a restore: the old host's watches end (their DONE is dropped)."""
        with self.mu:
            watches = list(self.items.values())
        for watch in watches:
            watch.stop()

    def settle(self) -> None:
        """Before a file operation of the host's: let every recursive watch take in what is
        pending, so a directory made by the previous call is watched before this one writes
        into it (no race between the host's own calls; user code's ``mkdir -p a/b && echo >
        a/b/f`` stays inotify's race: f is then reported by the walk of the new directory)."""
        with self.mu:
            watches = [w for w in self.items.values() if w.recursive]
        for watch in watches:
            watch.drain()

    def flush(self, target: int) -> bool:
        """Send the events of watch ``target`` that the kernel holds now (before the caller's
        DONE: a barrier for "every event up until now")."""
        with self.mu:
            watch = self.items.get(target)
        if watch is None:
            return False
        watch.drain()
        return True
