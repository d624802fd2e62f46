"""File operations, resolved INSIDE the sandbox.

The host never touches sandbox files by path: every operation happens here, in the sandbox's
own mount namespace, so a symlink planted by user code can only ever point at something the
sandbox could reach anyway.
"""

from __future__ import annotations

import contextlib
import os
import stat

from moat.agent.channel import Channel
from moat.protocol import CHUNK_SIZE, MsgType
from moat.protocol import metadata as meta
from moat.protocol.contract import HOME

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any


class FileError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def resolve(path: str) -> str:
    """Absolute path for ``path``; relative paths are relative to the home directory."""
    if not path or "\0" in path:
        raise FileError("invalid", "invalid path")
    return os.path.normpath(path if path.startswith("/") else os.path.join(HOME, path))


def _oserror(exc: OSError) -> FileError:
    import errno

    if exc.errno == errno.ENOENT:
        return FileError("not_found", "no such file or directory")
    if exc.errno == errno.EEXIST:
        return FileError("exists", "file exists")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: the disk limit's rlimit
        return FileError("no_space", "not enough disk space")
    if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return FileError("unsupported", "not supported by this filesystem")
    return FileError("io", exc.strerror or "I/O error")


def _type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def entry(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    st = st or os.lstat(path)
    info: dict[str, Any] = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": _type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "permissions": stat.filemode(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
    }
    if stat.S_ISLNK(st.st_mode):
        try:
            info["symlink_target"] = os.readlink(path)
        except OSError:
            pass
    else:
        found = read_metadata(path)
        if found:
            info["metadata"] = found
    return info


def read_metadata(target: str | int) -> dict[str, str]:
    """The file's ``user.e2b.*`` attributes that are valid metadata (others, set by user
    code, are left out: the host refuses a reply that carries them), within the size cap."""
    try:
        names = sorted(n for n in os.listxattr(target) if n.startswith(meta.PREFIX))
    except OSError:
        return {}  # no attributes on this filesystem: no metadata
    out: dict[str, str] = {}
    for name in names:
        try:
            value = os.getxattr(target, name).decode("ascii")
        except (OSError, UnicodeDecodeError):
            continue
        trial = {**out, name[len(meta.PREFIX) :]: value}
        if meta.problem(trial) is None:
            out = trial
    return out


def write_metadata(fd: int, metadata: dict[str, str]) -> None:
    """Make ``metadata`` the file's whole metadata set (stale keys go, as E2B's do)."""
    problem = meta.problem(metadata)
    if problem is not None:
        raise FileError("invalid", problem)
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if not metadata and _oserror(exc).kind == "unsupported":
            return  # nothing to clear where there can be nothing
        raise _oserror(exc) from exc
    try:
        for name in names:
            if name.startswith(meta.PREFIX) and name[len(meta.PREFIX) :] not in metadata:
                os.removexattr(fd, name)
        for key, value in metadata.items():
            os.setxattr(fd, meta.PREFIX + key, value.encode("ascii"))
    except OSError as exc:
        raise _oserror(exc) from exc


def open_read(p: str) -> int:
    """A descriptor of ``p`` for reading (as whoever calls it: rootops runs it as root)."""
    try:
        return os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _oserror(exc) from exc


def open_write(p: str, metadata: dict[str, str] | None) -> int:
    """A descriptor of ``p`` (parents made) truncated for writing, its metadata replaced."""
    try:
        parent = os.path.dirname(p)
        os.makedirs(parent, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except IsADirectoryError as exc:
        raise FileError("invalid", "path is a directory") from exc
    except OSError as exc:
        raise _oserror(exc) from exc
    # envd opens, chowns to the user, then writes: watchers of an upload see create,
    # chmod, write, and E2B's clients count on that. A chown to the owner it has already
    # (the file is the caller's here) gives the same event and changes nothing.
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        os.fchown(fd, st.st_uid, st.st_gid)
    if metadata is not None:
        try:
            write_metadata(fd, metadata)
        except FileError:
            os.close(fd)
            raise
    return fd


class Files:
    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        #: open writes by request id: file, bytes so far, cap, path
        self.writes: dict[int, tuple[IO[bytes], int, int, str]] = {}

    def read(self, rid: int, path: str, max_bytes: int, root: bool = False) -> None:
        p = resolve(path)
        if root:
            from moat.agent import rootops

            fd = rootops.run(open_read, p, fd_result=True)
        else:
            fd = open_read(p)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FileError("invalid", "path is a directory")
            raise FileError("invalid", "not a regular file")
        with os.fdopen(fd, "rb", buffering=0) as f:
            if st.st_size > max_bytes:
                raise FileError(
                    "too_large", f"file is larger than the read cap ({max_bytes} bytes)"
                )
            total = 0
            while True:
                chunk = f.read(CHUNK_SIZE)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:  # it grew while we read
                    raise FileError(
                        "too_large", f"file is larger than the read cap ({max_bytes} bytes)"
                    )
                self.ch.send(MsgType.DATA, rid, chunk)
        self.ch.done(rid, size=total)

    def write_open(
        self,
        rid: int,
        path: str,
        max_bytes: int,
        metadata: dict[str, str] | None = None,
        root: bool = False,
    ) -> None:
        """Open ``path`` for a streamed write; ``metadata`` (when given) replaces the file's
        metadata before any content arrives, so an unsupported one fails the write early."""
        p = resolve(path)
        if root:
            from moat.agent import rootops

            fd = rootops.run(open_write, p, metadata, fd_result=True)
        else:
            fd = open_write(p, metadata)
        self.writes[rid] = (open(fd, "wb"), 0, max_bytes, p)

    def write_chunk(self, rid: int, data: bytes, eof: bool) -> None:
        item = self.writes.get(rid)
        if item is None:
            return  # the write already failed and was reported
        f, size, cap, path = item
        try:
            size += len(data)
            if size > cap:
                raise FileError("too_large", f"write exceeds the cap ({cap} bytes)")
            f.write(data)
            self.writes[rid] = (f, size, cap, path)
            if eof:
                f.close()
                del self.writes[rid]
                self.ch.done(rid, size=size, path=path)
        except OSError as exc:
            self._abort(rid)
            err = _oserror(exc)
            self.ch.fail(rid, err.kind, str(err))
        except FileError as err:
            self._abort(rid)
            self.ch.fail(rid, err.kind, str(err))

    def drop_writes(self) -> None:
        """After a restore: the old host's streamed writes end where they were."""
        for rid in list(self.writes):
            self._abort(rid)

    def _abort(self, rid: int) -> None:
        item = self.writes.pop(rid, None)
        if item is not None:
            try:
                item[0].close()
            except OSError:
                pass

    def list(self, path: str, depth: int) -> list[dict[str, Any]]:
        root = resolve(path)
        out: list[dict[str, Any]] = []
        try:
            st = os.stat(root)
        except OSError as exc:
            raise _oserror(exc) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise FileError("invalid", "not a directory")

        def walk(d: str, level: int) -> None:
            try:
                names = sorted(os.listdir(d))
            except OSError as exc:
                if d == root:
                    raise _oserror(exc) from exc
                return
            for name in names:
                full = os.path.join(d, name)
                try:
                    e = entry(full)
                except OSError:
                    continue
                out.append(e)
                if len(out) > 10000:
                    raise FileError("too_large", "directory listing exceeds 10000 entries")
                if e["type"] == "dir" and level < depth:
                    walk(full, level + 1)

        walk(root, 1)
        return out

    def stat(self, path: str) -> dict[str, Any]:
        p = resolve(path)
        try:
            return entry(p)
        except OSError as exc:
            raise _oserror(exc) from exc

    def remove(self, path: str) -> None:
        p = resolve(path)
        try:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                import shutil

                shutil.rmtree(p)
            else:
                os.unlink(p)
        except OSError as exc:
            raise _oserror(exc) from exc

    def move(self, path: str, dst: str) -> dict[str, Any]:
        """Rename or move ``path`` to ``dst`` (parents made); the entry at ``dst``."""
        src, target = resolve(path), resolve(dst)
        try:
            os.lstat(src)
            parent = os.path.dirname(target)
            if parent:
                os.makedirs(parent, exist_ok=True)
            import shutil

            shutil.move(src, target)
            return entry(target)
        except OSError as exc:
            raise _oserror(exc) from exc

    def mkdir(self, path: str) -> bool:
        p = resolve(path)
        if os.path.isdir(p):
            return False
        try:
            os.makedirs(p)
        except OSError as exc:
            raise _oserror(exc) from exc
        return True
