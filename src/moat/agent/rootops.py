"""File operations as root of the sandbox (``user="root"``; docs/users.md).

The agent acts as the sandbox user; a root file operation runs in a forked child that takes
uid 0 back (``shield.root_ids``: root's bounded capabilities, never more) and hands back its
result as JSON, or the file it opened (a read's or a write's) as a descriptor over a socket
pair. The agent's own threads never change ids (glibc applies a uid change to every thread).

Trust domain: sandbox (runs inside, stdlib only). Root inside is no boundary for the host:
the host checks every reply as before (invariant 6).
"""

from __future__ import annotations

import json
import os
import shutil  # noqa: F401 - imported before any fork: the files module needs it lazily
import socket

from moat.agent import shield
from moat.agent.files import FileError, _oserror

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The most one reply may carry (a listing of 10,000 entries fits).
MAX_REPLY = 64 << 20


def run(fn: Callable[..., Any], *args: Any, fd_result: bool = False) -> Any:
    """``fn(*args)`` as root in a child; its JSON result, or the descriptor it returned
    (``fd_result``). A FileError of the child's is raised here as it was there."""
    if not shield.can_root():
        raise FileError("unsupported", "this sandbox cannot run file operations as root")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with shield.spawn_lock:
        pid = os.fork()
        if pid != 0:
            child = shield.own(pid)
    if pid == 0:  # pragma: no cover - the child: exits, never returns
        _child(theirs, ours, fn, args, fd_result)
    theirs.close()
    try:
        return _reply(ours, fd_result)
    finally:
        ours.close()
        child.wait()


def _child(
    sock: socket.socket, other: socket.socket, fn: Callable[..., Any], args: Any, fd_result: bool
) -> None:
    try:
        other.close()
        shield.root_ids()
        try:
            out = fn(*args)
            reply: dict[str, Any] = {"ok": None if fd_result else out}
        except FileError as err:
            reply, out = {"kind": err.kind, "message": str(err)}, None
        except OSError as exc:
            failed = _oserror(exc)
            reply, out = {"kind": failed.kind, "message": str(failed)}, None
        data = json.dumps(reply).encode()
        if fd_result and out is not None:
            socket.send_fds(sock, [data], [out])
        else:
            sock.sendall(data)
        sock.close()
        os._exit(0)
    except BaseException:  # noqa: BLE001 - the parent reads "internal" from the empty reply
        os._exit(1)


def _reply(sock: socket.socket, fd_result: bool) -> Any:
    fds: list[int] = []
    if fd_result:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 1)
        chunks = [data]
    else:
        chunks = []
        size = 0
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise FileError("too_large", "the reply is too large")
    try:
        reply = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        for fd in fds:
            os.close(fd)
        raise FileError("internal", "the root file operation failed")
    if "kind" in reply:
        for fd in fds:
            os.close(fd)
        raise FileError(str(reply["kind"]), str(reply.get("message", "")))
    if fd_result:
        if len(fds) != 1:
            raise FileError("internal", "the root file operation returned no file")
        return fds[0]
    return reply["ok"]
